"""μ-queues: one FIFO of waiting work per layer (block, slot).

On expert ranks slot = local expert index; on attention ranks slot = 0.
Items are opaque; each carries a token count. Token lengths live in one numpy
int64 matrix updated incrementally, so a scheduler can read the whole state as
`lengths` without walking the deques.
"""
from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np


class MuQueues:
    """One FIFO per layer (block, slot) with incrementally maintained token counts."""

    def __init__(self, num_blocks: int, num_slots: int) -> None:
        if num_blocks < 1 or num_slots < 1:
            raise ValueError(f"num_blocks and num_slots must be >= 1, got {num_blocks}, {num_slots}")
        self.num_blocks = int(num_blocks)
        self.num_slots = int(num_slots)
        # (item, num_tokens) pairs; token count kept beside the item so pop needs no callback.
        self._fifos: list[list[deque]] = [[deque() for _ in range(num_slots)] for _ in range(num_blocks)]
        self._lengths = np.zeros((num_blocks, num_slots), dtype=np.int64)
        self._total = 0
        self._num_items = 0

    def _check(self, block: int, slot: int) -> None:
        if not (0 <= block < self.num_blocks and 0 <= slot < self.num_slots):
            raise ValueError(
                f"queue ({block}, {slot}) out of range for {self.num_blocks} blocks x {self.num_slots} slots"
            )

    def push(self, block: int, slot: int, item: Any, num_tokens: int) -> None:
        self._check(block, slot)
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        self._fifos[block][slot].append((item, int(num_tokens)))
        self._lengths[block, slot] += num_tokens
        self._total += num_tokens
        self._num_items += 1

    def push_many(self, block: int, slots: list[int], items: list, num_tokens: list[int]) -> None:
        """push(block, slots[i], items[i], num_tokens[i]) for every i (distinct slots), checked
        once: one dispatch message fills several queues at once."""
        if not (len(slots) == len(items) == len(num_tokens)):
            raise ValueError(f"{len(slots)} slots, {len(items)} items and {len(num_tokens)} counts")
        if not slots:
            return
        if not 0 <= block < self.num_blocks or min(slots) < 0 or max(slots) >= self.num_slots:
            raise ValueError(f"queues ({block}, {slots}) out of range for {self.num_blocks} blocks x "
                             f"{self.num_slots} slots")
        if min(num_tokens) < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        fifos, row = self._fifos[block], self._lengths[block]
        for s, item, n in zip(slots, items, num_tokens):  # a message's few experts: no np.add.at set-up
            fifos[s].append((item, n))
            row[s] += n
        self._total += sum(num_tokens)
        self._num_items += len(items)

    def pop(self, block: int, slot: int, max_tokens: int | None = None) -> list:
        """Drain items in FIFO order.

        With max_tokens, stop before the running token sum would exceed it, but always
        take at least one item if the queue is non-empty (an oversized item must still
        make progress rather than block the queue forever).
        """
        self._check(block, slot)
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        fifo = self._fifos[block][slot]
        out: list = []
        taken = 0
        while fifo:
            item, n = fifo[0]
            if max_tokens is not None and out and taken + n > max_tokens:
                break
            fifo.popleft()
            out.append(item)
            taken += n
        self._lengths[block, slot] -= taken
        self._total -= taken
        self._num_items -= len(out)
        return out

    @property
    def lengths(self) -> np.ndarray:
        """Tokens waiting, shape [num_blocks, num_slots].

        Returned without copying (read on every scheduling decision). Callers must NOT
        mutate it; copy it if a snapshot is needed.
        """
        return self._lengths

    def num_items(self, block: int, slot: int) -> int:
        self._check(block, slot)
        return len(self._fifos[block][slot])

    def total(self) -> int:
        """Total tokens waiting over all queues."""
        return self._total

    def __len__(self) -> int:
        """Number of items (not tokens) waiting over all queues."""
        return self._num_items

    def is_empty(self) -> bool:
        return self._num_items == 0
