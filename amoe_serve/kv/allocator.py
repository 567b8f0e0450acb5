"""Paged KV-cache block allocator (pure bookkeeping, no tensors).

Each owner (a request / sequence id) holds a block table: the ordered list of
physical block ids covering its tokens. Blocks are handed out LIFO from a free
list so recently freed (cache-warm) blocks are reused first.
"""
from __future__ import annotations

from typing import Hashable

from amoe_serve.errors import AmoeError


class OutOfBlocks(AmoeError, RuntimeError):
    """Not enough free KV blocks for the request; the caller should wait or preempt."""


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self._num_blocks = int(num_blocks)
        self._block_size = int(block_size)
        # Reversed so pop() hands out block 0 first: deterministic, readable tables.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[Hashable, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self._block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= len(self._free)

    def _take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, only {len(self._free)} of {self._num_blocks} free")
        taken = self._free[len(self._free) - n:][::-1]
        del self._free[len(self._free) - n:]
        return taken

    def allocate(self, owner: Hashable, num_tokens: int) -> list[int]:
        """New block table for owner covering num_tokens. Raises OutOfBlocks, leaving state unchanged."""
        if owner in self._tables:
            raise ValueError(f"owner {owner!r} already has a block table; use extend()")
        table = self._take(self.blocks_needed(num_tokens))
        self._tables[owner] = table
        return table

    def extend(self, owner: Hashable, num_tokens_total: int) -> list[int]:
        """Grow owner's table to cover num_tokens_total; returns the same (mutated) list.

        Never shrinks. Raises OutOfBlocks without partial growth.
        """
        table = self._tables.get(owner)
        if table is None:
            raise ValueError(f"unknown owner {owner!r}; allocate() first")
        extra = self.blocks_needed(num_tokens_total) - len(table)
        if extra > 0:
            table.extend(self._take(extra))
        return table

    def free(self, owner: Hashable) -> int:
        """Return owner's blocks to the pool; unknown owner is a no-op returning 0."""
        table = self._tables.pop(owner, None)
        if table is None:
            return 0
        # Reverse so the owner's first block is the next handed out.
        self._free.extend(reversed(table))
        return len(table)

    def table(self, owner: Hashable) -> list[int]:
        table = self._tables.get(owner)
        if table is None:
            raise ValueError(f"unknown owner {owner!r}")
        return table

    def owners(self) -> list:
        return list(self._tables)

    def __contains__(self, owner: object) -> bool:
        return owner in self._tables
