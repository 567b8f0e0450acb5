"""From an OpenAI/vLLM request body to the data plane's sampling parameters (vLLM's semantics),
checked once here: every refusal is an `APIError` 400 naming the parameter.

- `n` samples per prompt are n data-plane requests; sample j > 0 of a seeded request draws from
  its own seed (`sample_seed`), so the n samples differ and the set is reproducible.
- `best_of` > 1 is refused (vLLM removed it); parameters that vLLM knows and this server does
  not implement are refused by name (`UNSUPPORTED`), never ignored.
- Structured output (`response_format`, `structured_outputs`) is parsed here (a bad schema or
  regex is a 400), then compiled into a token mask on the attention rank.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from amoe_serve.sampler import MAX_LOGPROBS, SamplingParams, StructuredSpec
from amoe_serve.serving.errors import APIError
from amoe_serve.serving.settings import ServingConfig
from amoe_serve.sampler.grammar import GrammarError, compile_check

SEED_MAX = 2**63 - 1
# Longest stop_token_ids list: each generated token is looked up in it on the attention rank, and
# the request must fit in one link frame.
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024
MAX_N = 16

# Known request fields this server does not implement: a 400 naming them, not a silent no-op.
UNSUPPORTED = {
    "suffix": "suffix (fill-in-the-middle) is not supported",
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "allowed_token_ids": "allowed_token_ids is not supported; use logit_bias",
    "bad_words": "bad_words is not supported; use logit_bias",
    "logits_processors": "custom logits processors are not supported",
    "guided_json": "guided_* fields were replaced by structured_outputs (as in vLLM)",
    "guided_regex": "guided_* fields were replaced by structured_outputs (as in vLLM)",
    "guided_choice": "guided_* fields were replaced by structured_outputs (as in vLLM)",
    "guided_grammar": "guided_* fields were replaced by structured_outputs (as in vLLM)",
    "use_beam_search": "beam search is not supported",
    "length_penalty": "beam search is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
}


def refuse_unsupported(body: dict) -> None:
    for name, why in UNSUPPORTED.items():
        v = body.get(name)
        if v is not None and v is not False and v != [] and not (name == "tool_choice" and v == "none"):
            raise APIError(400, why, param=name)


def sample_seed(seed: Optional[int], j: int) -> Optional[int]:
    """Seed of sample j of an n-sample request (splitmix64 of (seed, j)); sample 0 keeps the seed."""
    if seed is None or j == 0:
        return seed
    z = (seed + 0x9E3779B97F4A7C15 * j) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & SEED_MAX


def structured_spec(req, entry) -> Optional[StructuredSpec]:
    """response_format / structured_outputs -> one StructuredSpec (or None); bad ones are 400,
    and so is any on a data plane that cannot build grammar masks (no tokenizer.json)."""
    specs: list[StructuredSpec] = []
    rf = req.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            specs.append(StructuredSpec("json_object"))
        else:
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
            specs.append(StructuredSpec("json", json.dumps(rf.json_schema.schema_)))
    so = req.structured_outputs
    if so is not None:
        given = {k: v for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                   ("grammar", so.grammar)) if v is not None}
        if so.json_object:
            given["json_object"] = True
        if len(given) != 1:
            raise APIError(400, "structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
                           param="structured_outputs")
        kind, v = next(iter(given.items()))
        if kind == "json":
            specs.append(StructuredSpec("json", v if isinstance(v, str) else json.dumps(v)))
        elif kind == "choice":
            if not v:
                raise APIError(400, "structured_outputs.choice must not be empty", param="structured_outputs")
            specs.append(StructuredSpec("choice", json.dumps(v)))
        elif kind == "json_object":
            specs.append(StructuredSpec("json_object"))
        else:
            specs.append(StructuredSpec(kind, v))
    if len(specs) > 1:
        raise APIError(400, "give response_format or structured_outputs, not both", param="structured_outputs")
    if not specs:
        return None
    if not entry.link.info.structured_output:
        raise APIError(400, f"model {entry.name!r} has no tokenizer in its data plane: structured output is not "
                            f"available", param="response_format" if rf is not None else "structured_outputs")

    try:
        compile_check(specs[0])
    except GrammarError as exc:
        raise APIError(400, str(exc), param="response_format" if rf is not None else "structured_outputs") from None
    return specs[0]


@dataclass
class Prepared:
    """One prompt, ready to submit: its ids, the data-plane params and the text stop strings."""
    prompt_ids: list[int]
    params: SamplingParams
    stops: list[str]


def _num(req, name: str, lo: float, hi: float) -> None:
    v = getattr(req, name)
    if v is not None and not (lo <= v <= hi):
        raise APIError(400, f"{name} must be in [{lo:g}, {hi:g}], got {v}", param=name)


def check_common(req, entry, settings: ServingConfig) -> None:
    """Checks that do not depend on the prompt (done once per request, not per prompt)."""
    if not 1 <= req.n <= MAX_N:
        raise APIError(400, f"n must be in [1, {MAX_N}], got {req.n}", param="n")
    _num(req, "presence_penalty", -2.0, 2.0)
    _num(req, "frequency_penalty", -2.0, 2.0)
    _num(req, "min_p", 0.0, 1.0)
    if req.repetition_penalty is not None and not req.repetition_penalty > 0:
        raise APIError(400, f"repetition_penalty must be > 0, got {req.repetition_penalty}", param="repetition_penalty")
    if req.top_k is not None and req.top_k < -1:
        raise APIError(400, f"top_k must be -1, 0 (all tokens) or >= 1, got {req.top_k}", param="top_k")
    if req.seed is not None and not (0 <= req.seed <= SEED_MAX):
        raise APIError(400, f"seed must be in [0, 2^63), got {req.seed}", param="seed")
    if req.min_tokens < 0:
        raise APIError(400, f"min_tokens must be >= 0, got {req.min_tokens}", param="min_tokens")
    if req.prompt_logprobs is not None and not 0 <= req.prompt_logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {req.prompt_logprobs}",
                       param="prompt_logprobs")
    k = req.truncate_prompt_tokens
    if k is not None and (k == 0 or k < -1):
        raise APIError(400, "truncate_prompt_tokens must be >= 1 (or -1: max_model_len)", param="truncate_prompt_tokens")
    stops = req.stop_list()
    if stops:
        if entry.tokenizer is None:
            raise APIError(400, f"model {entry.name!r} has no tokenizer: text stop strings are not supported",
                           param="stop")
        if len(stops) > settings.max_stop_strings:
            raise APIError(400, f"at most {settings.max_stop_strings} stop strings", param="stop")
        if any(s == "" for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
    vocab = entry.link.info.vocab_size
    stop_ids = req.stop_token_ids or []
    if len(stop_ids) > MAX_STOP_TOKEN_IDS:
        raise APIError(400, f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(stop_ids)}", param="stop_token_ids")
    check_ids(stop_ids, vocab, "stop_token_ids")
    if req.logit_bias:
        if len(req.logit_bias) > MAX_LOGIT_BIAS:
            raise APIError(400, f"at most {MAX_LOGIT_BIAS} logit_bias entries", param="logit_bias")
        for k in req.logit_bias:
            if not k.strip().isdigit() or not 0 <= int(k) < vocab:
                raise APIError(400, f"logit_bias key {k!r} is not a token id in [0, {vocab})", param="logit_bias")


def check_ids(ids: list[int], vocab: int, what: str) -> None:
    for t in ids:
        if not (0 <= t < vocab):
            raise APIError(400, f"{what} contains token id {t}, outside the vocabulary [0, {vocab})", param=what)


def truncate(ids: list[int], req, max_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep the last k prompt tokens (-1: max_model_len)."""
    k = req.truncate_prompt_tokens
    if k is None:
        return ids
    k = max_len if k == -1 else k
    return ids[-k:]


def prepare(entry, settings: ServingConfig, req, prompt_ids: list[int], max_tokens: Optional[int],
            default_max: Optional[int], logprobs: Optional[int], prompt_logprobs: Optional[int],
            structured: Optional[StructuredSpec]) -> Prepared:
    max_len = entry.link.info.max_model_len
    prompt_ids = truncate(prompt_ids, req, max_len)
    n = len(prompt_ids)
    if n == 0:
        raise APIError(400, "the prompt is empty", param="prompt")
    prompt_limit = max_len - 1
    if settings.max_prompt_tokens > 0:
        prompt_limit = min(prompt_limit, settings.max_prompt_tokens)
    if n > prompt_limit:
        raise APIError(400, f"the prompt has {n} tokens, more than the limit of {prompt_limit} "
                            f"(max_model_len {max_len})", param="prompt", code="context_length_exceeded")
    room = max_len - n
    limit = settings.max_tokens_limit
    if max_tokens is None:
        mt = room if default_max is None else default_max
        mt = min(mt, room)
        if limit > 0:
            mt = min(mt, limit)
    else:
        mt = max_tokens
        if mt < 1:
            raise APIError(400, f"max_tokens must be >= 1, got {mt}", param="max_tokens")
        if limit > 0 and mt > limit:
            raise APIError(400, f"max_tokens={mt} exceeds the limit of {limit}", param="max_tokens")
        if n + mt > max_len:
            raise APIError(400, f"prompt ({n} tokens) + max_tokens ({mt}) exceeds max_model_len ({max_len})",
                           param="max_tokens", code="context_length_exceeded")
    if req.min_tokens > mt:
        raise APIError(400, f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({mt})", param="min_tokens")
    fields: dict[str, Any] = {
        "max_tokens": mt,
        "temperature": entry.default_temperature if req.temperature is None else req.temperature,
        "top_p": entry.default_top_p if req.top_p is None else req.top_p,
        "seed": req.seed,
        "stop_token_ids": list(req.stop_token_ids or []),
        "ignore_eos": req.ignore_eos,
        "min_tokens": req.min_tokens,
        "top_k": 0 if req.top_k is None else req.top_k,
        "min_p": req.min_p or 0.0,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "repetition_penalty": 1.0 if req.repetition_penalty is None else req.repetition_penalty,
        "logit_bias": dict(req.logit_bias or {}),
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "structured": structured,
    }
    try:
        params = SamplingParams.from_dict(fields)
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    return Prepared(prompt_ids, params, req.stop_list())
