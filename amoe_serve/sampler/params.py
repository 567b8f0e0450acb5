"""Per-request sampling parameters, with vLLM's names, ranges and defaults.

They travel gateway -> attention rank as a JSON object; `to_dict()` leaves out every field at
its default, so a plain greedy request costs a few bytes, and `from_dict()` refuses unknown keys
and wrong types (ValueError), so a misspelt parameter is never silently ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

MAX_LOGPROBS = 20  # vLLM's default max_logprobs
LOGIT_BIAS_LIMIT = 100.0  # OpenAI: each bias is clamped to [-100, 100]
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class StructuredSpec:
    """A constraint on the output, compiled on the attention rank into a token mask.
    kind: json (value: a JSON schema as a JSON string), json_object (any JSON object; value
    ignored), regex, choice (value: a JSON list of strings), grammar (EBNF/GBNF)."""
    kind: str
    value: str = ""

    def validate(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(STRUCTURED_KINDS)}, got {self.kind!r}")
        if not isinstance(self.value, str):
            raise ValueError("structured output value must be a string")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens exist
    temperature: float = 0.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # top logprobs per generated token (0: only the sampled one's)
    prompt_logprobs: Optional[int] = None  # the same for every prompt token after the first
    structured: Optional[StructuredSpec] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_processing(self) -> bool:
        """Logits must be changed before sampling (bias, penalties, min_tokens, a grammar)."""
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0 or self.min_tokens or self.structured is not None)

    def validate(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if not _is_number(self.temperature) or not (self.temperature >= 0.0) or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (all tokens) or a positive integer, got {self.top_k!r}")
        if not _is_number(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not (-2.0 <= v <= 2.0):
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
        if not _is_number(self.repetition_penalty) or not (0.0 < self.repetition_penalty <= 2.0**31):
            raise ValueError(f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")
        if not isinstance(self.logit_bias, dict) or not all(
                _is_int(k) and k >= 0 and _is_number(v) and abs(v) != float("inf") and v == v
                for k, v in self.logit_bias.items()):
            raise ValueError("logit_bias must map token ids (>= 0) to finite numbers")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2^63) or None, got {self.seed!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {v!r}")
        if self.structured is not None:
            if not isinstance(self.structured, StructuredSpec):
                raise ValueError("structured must be a StructuredSpec")
            self.structured.validate()

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the request names must exist in the model."""
        for what, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", list(self.logit_bias))):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"{what} has token id {bad[0]}, outside the vocabulary [0, {vocab_size})")

    def to_dict(self) -> dict:
        """JSON-ready, without the fields at their defaults (see `from_dict`)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
            if v == default:
                continue
            if f.name == "logit_bias":
                v = {str(k): b for k, b in v.items()}
            elif f.name == "structured":
                v = {"kind": v.kind, "value": v.value}
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        """Build from a request dict; unknown keys and wrong types raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"sampling params must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(map(str, unknown))}; known: {', '.join(sorted(known))}")
        kwargs = dict(d)
        # Accept ints for float fields (JSON "temperature": 1); types are checked in validate().
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if name in kwargs and _is_number(kwargs[name]):
                kwargs[name] = float(kwargs[name])
        if "stop_token_ids" in kwargs and isinstance(kwargs["stop_token_ids"], tuple):
            kwargs["stop_token_ids"] = list(kwargs["stop_token_ids"])
        if "logit_bias" in kwargs:
            kwargs["logit_bias"] = _parse_bias(kwargs["logit_bias"])
        s = kwargs.get("structured")
        if isinstance(s, dict):
            if set(s) - {"kind", "value"} or "kind" not in s:
                raise ValueError("structured must be {'kind': ..., 'value': ...}")
            kwargs["structured"] = StructuredSpec(s["kind"], s.get("value", ""))
        elif s is not None and not isinstance(s, StructuredSpec):
            raise ValueError("structured must be an object {'kind', 'value'} or null")
        params = cls(**kwargs)
        params.validate()
        return params


def _parse_bias(b: Any) -> dict[int, float]:
    """{"123": 5.0} (JSON keys are strings) or {123: 5.0}: ids as ints, biases clamped like OpenAI."""
    if not isinstance(b, dict):
        raise ValueError("logit_bias must be an object mapping token ids to biases")
    out: dict[int, float] = {}
    for k, v in b.items():
        try:
            tid = int(k) if not isinstance(k, bool) else None
        except (TypeError, ValueError):
            tid = None
        if tid is None or (isinstance(k, str) and not k.strip().lstrip("-").isdigit()):
            raise ValueError(f"logit_bias key {k!r} is not a token id")
        if not _is_number(v):
            raise ValueError(f"logit_bias[{k!r}] must be a number, got {v!r}")
        out[tid] = max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(v)))
    return out
