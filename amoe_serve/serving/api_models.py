"""OpenAI-compatible request and response bodies (pydantic 2).

Requests accept and ignore unknown fields (OpenAI clients send many) but check the types of
the fields they know strictly: `"max_tokens": "16"` is a schema error (422), not 16.
Value checks that need the model (lengths, vocabulary) live in `openai_app`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: StrictBool = False


class JsonSchemaFormat(_Request):
    name: Optional[StrictStr] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[StrictBool] = None
    description: Optional[StrictStr] = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs`: exactly one of these."""
    json_: Optional[Union[dict[str, Any], StrictStr]] = Field(default=None, alias="json")
    regex: Optional[StrictStr] = None
    choice: Optional[list[StrictStr]] = None
    grammar: Optional[StrictStr] = None
    json_object: Optional[StrictBool] = None


class _SamplingFields(_Request):
    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[StrictFloat] = None
    top_p: Optional[StrictFloat] = None
    seed: Optional[StrictInt] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    n: StrictInt = 1
    user: Optional[StrictStr] = None
    presence_penalty: Optional[StrictFloat] = None
    frequency_penalty: Optional[StrictFloat] = None
    logit_bias: Optional[dict[StrictStr, StrictFloat]] = None
    response_format: Optional[ResponseFormat] = None
    # vLLM extensions.
    ignore_eos: StrictBool = False
    stop_token_ids: Optional[list[StrictInt]] = None
    top_k: Optional[StrictInt] = None
    min_p: Optional[StrictFloat] = None
    repetition_penalty: Optional[StrictFloat] = None
    min_tokens: StrictInt = 0
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    truncate_prompt_tokens: Optional[StrictInt] = None
    prompt_logprobs: Optional[StrictInt] = None
    structured_outputs: Optional[StructuredOutputs] = None
    return_tokens_as_token_ids: StrictBool = False

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_SamplingFields):
    # A string, a list of token ids, or a batch: a list of strings or of token-id lists.
    prompt: Union[StrictStr, list[StrictInt], list[StrictStr], list[list[StrictInt]]]
    echo: StrictBool = False
    logprobs: Optional[StrictInt] = None
    suffix: Optional[StrictStr] = None
    best_of: Optional[StrictInt] = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: Optional[StrictStr] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ... are passed to the template
    role: StrictStr
    content: Optional[Union[StrictStr, list[ContentPart]]] = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    # OpenAI's newer name for max_tokens.
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = None
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None


class TokenizeRequest(_Request):
    """POST /tokenize: `prompt`, or `messages` rendered with the chat template (vLLM's shapes)."""
    model: Optional[StrictStr] = None
    prompt: Optional[StrictStr] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None
    return_token_strs: StrictBool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[Optional[str]]] = None


class DetokenizeRequest(_Request):
    model: Optional[StrictStr] = None
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str


# ----------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Per token of the choice (prompt tokens first with echo): its text, logprob (None for the
    first prompt token), the top tokens {text: logprob} and its character offset in `text`."""
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Optional[str] = None
    logprobs: Optional[CompletionLogprobs] = None
    # vLLM: with prompt_logprobs, per prompt token {token id: PromptLogprob} (None for the first)
    prompt_logprobs: Optional[list[Optional[dict[str, PromptLogprob]]]] = None
    token_ids: list[int] = Field(default_factory=list)  # vendor field: the generated ids


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ChatMessageOut(BaseModel):
    role: str = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: Optional[str] = None
    logprobs: Optional[ChatLogprobs] = None
    token_ids: list[int] = Field(default_factory=list)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: Optional[list[Optional[dict[str, PromptLogprob]]]] = None  # vLLM extension


class CompletionStreamChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Optional[str] = None
    logprobs: Optional[CompletionLogprobs] = None
    token_ids: list[int] = Field(default_factory=list)


class CompletionChunk(BaseModel):
    """One SSE event of a streamed /v1/completions (the usage event has no choices)."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: Optional[Usage] = None


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Optional[str] = None
    logprobs: Optional[ChatLogprobs] = None
    token_ids: list[int] = Field(default_factory=list)


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed /v1/chat/completions (the usage event has no choices)."""
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "amoe-serve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body (OpenAI's shape)."""
    error: ErrorDetail


class HealthResponse(BaseModel):
    """GET /health: "ok" with every model's data plane up; else 503 with an `error` as well."""
    status: Literal["ok", "unavailable"]
    models: dict[str, Literal["ok", "down"]]
    error: Optional[ErrorDetail] = None


def error_body(message: str, type_: str, param: Optional[str] = None, code: Any = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
