"""Token sampling: greedy, temperature and top-p (nucleus), seeded per request.

Legend: B = batch rows, V = vocab.

Reproducibility: each seeded request owns a CPU torch.Generator and its row is
sampled on its own (per-row softmax/sort/multinomial), so the same seed yields the
same tokens whichever batch the row lands in.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Iterable

import torch


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 => greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not (self.temperature >= 0.0) or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2^63) or None, got {self.seed!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")

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
        for name in ("temperature", "top_p"):
            if name in kwargs and _is_number(kwargs[name]):
                kwargs[name] = float(kwargs[name])
        if "stop_token_ids" in kwargs and isinstance(kwargs["stop_token_ids"], tuple):
            kwargs["stop_token_ids"] = list(kwargs["stop_token_ids"])
        params = cls(**kwargs)
        params.validate()
        return params


def make_generator(seed: int | None) -> torch.Generator | None:
    """Seeded CPU generator for one request; None means use torch's global RNG."""
    if seed is None:
        return None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return gen


def _top_p_filter(probs_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero out tokens outside the smallest prefix (by probability) with mass >= top_p."""
    if top_p >= 1.0:
        return probs_V
    sorted_V, order_V = torch.sort(probs_V, descending=True, stable=True)
    cum_V = torch.cumsum(sorted_V, dim=0)
    # Keep a token if the mass strictly before it is < top_p; the top token is always kept.
    keep_sorted_V = (cum_V - sorted_V) < top_p
    keep_sorted_V[0] = True
    keep_V = torch.zeros_like(keep_sorted_V)
    keep_V[order_V] = keep_sorted_V
    return torch.where(keep_V, probs_V, torch.zeros_like(probs_V))


_FP32_TINY = torch.finfo(torch.float32).tiny


class Sampler:
    def sample(
        self,
        logits_BV: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> torch.Tensor:
        """One next token per row, LongTensor [B]."""
        if logits_BV.dim() != 2:
            raise ValueError(f"logits must be [B, V], got shape {tuple(logits_BV.shape)}")
        B = logits_BV.shape[0]
        if len(params) != B or len(generators) != B:
            raise ValueError(f"need one params and one generator per row: B={B}, got {len(params)}, {len(generators)}")
        # Greedy rows in one vectorized argmax (ties -> lowest id).
        tokens_B = torch.argmax(logits_BV, dim=-1).to(torch.long)
        for i, p in enumerate(params):
            if p.temperature == 0.0:
                continue
            # Per-row so a seeded row is independent of its batch neighbours. Sampling
            # runs on CPU because the generators are CPU generators.
            row_V = logits_BV[i].detach().to("cpu", torch.float32)
            # Max first, so a tiny temperature sends the rest to -inf (its limit: greedy) instead
            # of overflowing the top logit to +inf; and never below float32's smallest normal,
            # which a Python float like 1e-45 would round to (0/0 = NaN).
            row_V = (row_V - row_V.max()) / max(p.temperature, _FP32_TINY)
            probs_V = torch.softmax(row_V, dim=-1)
            probs_V = _top_p_filter(probs_V, p.top_p)
            tokens_B[i] = torch.multinomial(probs_V, 1, generator=generators[i]).item()
        return tokens_B


def finish_reason(
    token_id: int,
    num_generated: int,
    params: SamplingParams,
    eos_token_ids: Iterable[int],
) -> str | None:
    """Why generation stops after emitting token_id as the num_generated-th token.

    "stop" takes precedence over "length" when both apply.
    """
    if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in set(eos_token_ids)):
        return "stop"
    if num_generated >= params.max_tokens:
        return "length"
    return None
