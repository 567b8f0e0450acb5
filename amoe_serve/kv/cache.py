"""Paged KV storage: per layer K and V tensors [num_blocks, block_size, G, d].

Block tables (plain lists of block ids, allocated elsewhere) map a request's token
positions to slots: position p lives in block block_table[p // block_size], row p % block_size.
Legend: T=new tokens, L=context length, G=kv heads, d=head dim, N=num_blocks, S=block_size.
"""

from __future__ import annotations

from typing import Protocol

import torch

from amoe_serve.kv.batch import PagedBatch


class KVShape(Protocol):
    """What the cache needs of a model: `amoe_serve.model.ModelSpec` is one (the model layer
    sits above this one, so it is not imported here)."""
    num_blocks: int      # transformer blocks (layers)
    num_kv_heads: int
    head_dim: int


class PagedKVCache:
    def __init__(self, spec: KVShape, num_blocks: int, block_size: int, dtype: torch.dtype, device="cpu"):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        shape = (spec.num_blocks, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.k_LNSGd = torch.zeros(shape, dtype=dtype, device=device)
        self.v_LNSGd = torch.zeros(shape, dtype=dtype, device=device)
        # Per-layer [N*S, G, d] views, made once: the write of every block is one index_copy_.
        self._k_flat = [self.k_LNSGd[l].view(-1, spec.num_kv_heads, spec.head_dim) for l in range(spec.num_blocks)]
        self._v_flat = [self.v_LNSGd[l].view(-1, spec.num_kv_heads, spec.head_dim) for l in range(spec.num_blocks)]

    def _slots(self, block_table: list[int], start: int, n: int) -> torch.Tensor:
        """Flat slot index (block * S + row) of positions start..start+n."""
        S = self.block_size
        last = start + n
        if start < 0 or last > len(block_table) * S:
            raise ValueError(
                f"positions [{start}, {last}) do not fit in {len(block_table)} blocks of {S} tokens"
            )
        pos = torch.arange(start, last)
        table = torch.as_tensor(block_table, dtype=torch.int64)
        if table.numel() and (int(table.min()) < 0 or int(table.max()) >= self.num_blocks):
            raise ValueError(f"block ids must be in [0, {self.num_blocks}), got {block_table}")
        return (table[pos // S] * S + pos % S).to(self.k_LNSGd.device)

    def write(self, layer: int, block_table: list[int], start_pos: int, k_TGd: torch.Tensor, v_TGd: torch.Tensor):
        G, d = self.spec.num_kv_heads, self.spec.head_dim
        if k_TGd.shape != v_TGd.shape or k_TGd.dim() != 3 or tuple(k_TGd.shape[1:]) != (G, d):
            raise ValueError(f"k/v must be [T, {G}, {d}], got {tuple(k_TGd.shape)} / {tuple(v_TGd.shape)}")
        slots_T = self._slots(block_table, start_pos, k_TGd.shape[0])
        self.k_LNSGd[layer].view(-1, G, d)[slots_T] = k_TGd.to(self.dtype)
        self.v_LNSGd[layer].view(-1, G, d)[slots_T] = v_TGd.to(self.dtype)

    def gather(self, layer: int, block_table: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        G, d = self.spec.num_kv_heads, self.spec.head_dim
        slots_L = self._slots(block_table, 0, length)
        return self.k_LNSGd[layer].view(-1, G, d)[slots_L], self.v_LNSGd[layer].view(-1, G, d)[slots_L]

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer's K and V caches as [slots, G, d] views (slot = block * block_size + row)."""
        return self._k_flat[layer], self._v_flat[layer]

    def write_slots(self, layer: int, slots_T: torch.Tensor, k_TGd: torch.Tensor, v_TGd: torch.Tensor) -> None:
        """Write new tokens' K/V at precomputed flat slots (PagedBatch.write_slots_T)."""
        if k_TGd.dtype != self.dtype:
            k_TGd, v_TGd = k_TGd.to(self.dtype), v_TGd.to(self.dtype)
        self._k_flat[layer].index_copy_(0, slots_T, k_TGd)
        self._v_flat[layer].index_copy_(0, slots_T, v_TGd)

    def batch(self, tables: list, start_S: list[int], n_S: list[int]) -> PagedBatch:
        """KV addressing of a batch of spans (block tables as lists or int64 tensors)."""
        tables = [t if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=torch.int64) for t in tables]
        return PagedBatch.build(tables, start_S, n_S, self.block_size, self.num_blocks, self.k_LNSGd.device)
