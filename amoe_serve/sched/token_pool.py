"""Top-k merge pool on attention ranks.

Legend: T = tokens of an entry, K = top-k, D = hidden, R = rows of one delivery.

After routing at block b each token's hidden state goes to its K experts, possibly
on different expert ranks, and the expert outputs come back in any order. An entry
(e.g. key = (segment_id, block)) completes once all T*K (token, slot) outputs have
arrived; only then can the weighted combine and the next block run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable

import numpy as np
import torch

import amoe_kernels


@dataclass
class _Entry:
    out_TKD: torch.Tensor
    # Host-side bool marks, one per (token, slot), checked and set by amoe_kernels.pool_scatter
    # (this runs once per expert reply on the attention rank's critical path).
    delivered_X: np.ndarray
    remaining: int
    context: Any


class TokenPool:
    def __init__(self) -> None:
        self._entries: dict[Hashable, _Entry] = {}

    def open(
        self,
        key: Hashable,
        num_tokens: int,
        top_k: int,
        hidden: int,
        dtype: torch.dtype,
        context: Any = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Start waiting for num_tokens * top_k expert outputs.

        An entry with num_tokens == 0 is complete immediately (pop works at once).
        """
        if key in self._entries:
            raise ValueError(f"token pool entry {key!r} already open")
        if num_tokens < 0 or top_k < 1 or hidden < 1:
            raise ValueError(
                f"need num_tokens >= 0, top_k >= 1, hidden >= 1; got {num_tokens}, {top_k}, {hidden}"
            )
        # Uninitialised: every (token, slot) is written before pop, and untouched pages of a large
        # buffer stay out of the resident set until the replies land (by then the dispatch rows
        # sent from the same rank are usually freed), which lowers a prefill chunk's peak.
        out_TKD = torch.empty(num_tokens, top_k, hidden, dtype=dtype, device=device)
        self._entries[key] = _Entry(out_TKD, np.zeros(num_tokens * top_k, dtype=bool), num_tokens * top_k, context)

    def add(
        self,
        key: Hashable,
        token_idx_R: torch.Tensor,
        slot_R: torch.Tensor,
        out_RD: torch.Tensor,
    ) -> bool:
        """Scatter rows into out_TKD[token_idx, slot].

        Returns True exactly once: on the delivery that completes the entry.
        Validation happens before any write, so a rejected delivery leaves the entry intact.
        """
        entry = self._entries.get(key)
        if entry is None:
            raise ValueError(f"unknown token pool entry {key!r}")
        T, K, D = entry.out_TKD.shape
        if token_idx_R.dim() != 1 or slot_R.shape != token_idx_R.shape:
            raise ValueError(
                f"token_idx and slot must be 1-D of equal length, got {tuple(token_idx_R.shape)}, {tuple(slot_R.shape)}"
            )
        R = token_idx_R.numel()
        if out_RD.shape != (R, D):
            raise ValueError(f"out rows must have shape ({R}, {D}), got {tuple(out_RD.shape)}")
        if R == 0:
            return False
        if entry.remaining == 0:
            raise ValueError(f"token pool entry {key!r} is already complete")
        try:  # validated and marked before any row is written (one native pass on CPU)
            amoe_kernels.pool_scatter(token_idx_R, slot_R, entry.delivered_X, out_RD, entry.out_TKD)
        except ValueError as e:
            raise ValueError(f"entry {key!r}: {e}") from None
        entry.remaining -= R
        return entry.remaining == 0

    def is_complete(self, key: Hashable) -> bool:
        entry = self._entries.get(key)
        if entry is None:
            raise ValueError(f"unknown token pool entry {key!r}")
        return entry.remaining == 0

    def pop(self, key: Hashable) -> tuple[torch.Tensor, Any]:
        """Remove a complete entry and return (out_TKD, context)."""
        entry = self._entries.get(key)
        if entry is None:
            raise ValueError(f"unknown token pool entry {key!r}")
        if entry.remaining != 0:
            raise ValueError(f"token pool entry {key!r} incomplete: {entry.remaining} outputs missing")
        del self._entries[key]
        return entry.out_TKD, entry.context

    def pending_keys(self) -> list:
        """Keys still waiting for outputs (complete-but-unpopped entries excluded)."""
        return [k for k, e in self._entries.items() if e.remaining > 0]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries
