"""Token sampling: greedy, temperature, min-p, top-k and top-p, seeded per request.

Legend: B = batch rows, V = vocab.

Reproducibility: each seeded request owns a CPU torch.Generator and its row is
sampled on its own (per-row softmax/sort/multinomial), so the same seed yields the
same tokens whichever batch the row lands in. Rows that need their logits processed
(penalties, bias, min_tokens, a grammar) are processed together; the rest are untouched.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from amoe_serve.sampler.params import SamplingParams
from amoe_serve.sampler.processors import process
from amoe_serve.sampler.state import RowState


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


def _top_k_filter(probs_V: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= probs_V.shape[0]:
        return probs_V
    kth = torch.topk(probs_V, top_k).values[-1]
    return torch.where(probs_V >= kth, probs_V, torch.zeros_like(probs_V))


_FP32_TINY = torch.finfo(torch.float32).tiny


class Sampler:
    def sample(
        self,
        logits_BV: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        states: Optional[list[Optional[RowState]]] = None,
    ) -> torch.Tensor:
        """One next token per row, LongTensor [B]. `states` (per row, or None) carries what
        penalties, min_tokens and grammars need; rows without processing use the logits as given."""
        if logits_BV.dim() != 2:
            raise ValueError(f"logits must be [B, V], got shape {tuple(logits_BV.shape)}")
        B = logits_BV.shape[0]
        if len(params) != B or len(generators) != B:
            raise ValueError(f"need one params and one generator per row: B={B}, got {len(params)}, {len(generators)}")
        # A RowState exists only for requests whose parameters need processing (see AttentionCore.admit).
        proc = [i for i, s in enumerate(states) if s is not None] if states is not None else []
        if proc:
            logits_BV = logits_BV.to(torch.float32, copy=True)
            idx = torch.tensor(proc, device=logits_BV.device)
            logits_BV[idx] = process(logits_BV[idx], [states[i] for i in proc])
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
            if p.min_p > 0.0:
                probs_V = torch.where(probs_V >= p.min_p * probs_V.max(), probs_V, torch.zeros_like(probs_V))
            probs_V = _top_k_filter(probs_V, p.top_k)
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

    "stop" takes precedence over "length" when both apply; nothing stops before min_tokens.
    """
    if num_generated >= params.min_tokens and (
            token_id in params.stop_token_ids or (not params.ignore_eos and token_id in set(eos_token_ids))):
        return "stop"
    if num_generated >= params.max_tokens:
        return "length"
    return None
