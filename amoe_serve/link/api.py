"""The contract between the HTTP ingress and a data plane's gateway (the "link").

The ingress only sees this interface; `amoe_serve/link/client.py` implements it over an
authenticated socket, and tests may implement it in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Protocol

from amoe_serve.sampler.logprobs import TokenLogprobs
from amoe_serve.errors import AmoeError


class DataPlaneError(AmoeError):
    """The data plane refused or failed a request. `status` is the HTTP status the ingress
    should answer with: 400 (bad request), 429 (overloaded: retry later), 503 (down)."""

    def __init__(self, message: str, status: int = 503, retry_after: Optional[float] = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass
class ModelInfo:
    """What the gateway tells a client when it connects."""
    name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int] = field(default_factory=list)
    max_queued_requests: int = 0
    structured_output: bool = True  # the data plane can build grammar masks (its checkpoint has a tokenizer)


@dataclass
class GenEvent:
    token: Optional[int]           # a newly sampled token id, or None on a pure finish event
    finish_reason: Optional[str]   # "stop" | "length" | "abort" | "error" on the last event, else None
    error: Optional[str] = None
    logprobs: Optional[TokenLogprobs] = None  # of `token`, when the request asked for logprobs
    prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None  # first event, with prompt_logprobs


class DataPlaneLink(Protocol):
    info: ModelInfo

    async def connect(self) -> ModelInfo: ...

    def generate(self, prompt_token_ids: list[int], params: dict) -> AsyncIterator[GenEvent]:
        """Stream the request's tokens. `params` holds SamplingParams fields
        (`SamplingParams.to_dict()`). Raises DataPlaneError. Closing the
        iterator early (`aclose()`, e.g. the HTTP client went away) cancels the request in the
        data plane and frees its KV."""
        ...

    async def stats(self) -> dict:
        """Latest counters of every rank plus gateway state (waiting, running, KV free)."""
        ...

    async def healthy(self) -> bool: ...

    async def close(self) -> None: ...
