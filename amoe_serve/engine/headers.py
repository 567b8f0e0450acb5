"""Typed headers of the data plane's control messages (gateway <-> ranks), one encode and one
decode each; `tags.py` lists every tag with its header. The per-block DISPATCH / COMBINE headers
stay plain dicts of a few ints, built and read in one place each (`attention_core.attend`,
`expert_core._run` / `receive`): they are on the hot path, where a dataclass round trip per
message costs more than it buys."""

from __future__ import annotations

from dataclasses import dataclass

from amoe_serve.errors import AmoeError


class HeaderError(AmoeError, ValueError):
    """A control message whose header is not what its tag promises (a bug or a version skew)."""


def _field(h: dict, name: str, kind: type, tag: str):
    v = h.get(name)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise HeaderError(f"{tag} header needs {name!r} as {kind.__name__}, got {v!r}")
    return v


@dataclass(frozen=True)
class RequestHeader:
    """gateway -> attention rank: admit a request (params: `SamplingParams.to_dict()`)."""
    id: str
    prompt_token_ids: list[int]
    params: dict

    def encode(self) -> dict:
        return {"id": self.id, "prompt_token_ids": self.prompt_token_ids, "params": self.params}

    @classmethod
    def decode(cls, h: dict) -> "RequestHeader":
        return cls(_field(h, "id", str, "REQUEST"), _field(h, "prompt_token_ids", list, "REQUEST"),
                   _field(h, "params", dict, "REQUEST"))


@dataclass(frozen=True)
class CancelHeader:
    """gateway -> attention rank: stop a request (its segment is dropped at the sampler)."""
    id: str

    def encode(self) -> dict:
        return {"id": self.id}

    @classmethod
    def decode(cls, h: dict) -> "CancelHeader":
        return cls(_field(h, "id", str, "CANCEL"))


@dataclass(frozen=True)
class FatalHeader:
    """rank -> gateway: this rank is going down, and why."""
    rank: int
    role: str
    error: str

    def encode(self) -> dict:
        return {"rank": self.rank, "role": self.role, "error": self.error}

    @classmethod
    def decode(cls, h: dict) -> "FatalHeader":
        return cls(_field(h, "rank", int, "FATAL"), _field(h, "role", str, "FATAL"), _field(h, "error", str, "FATAL"))

    def describe(self) -> str:
        return f"rank {self.rank} ({self.role}) failed: {self.error}"
