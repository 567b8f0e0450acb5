"""Benchmark routing skew as in the AMoE paper: instead of the model's router, each token's
experts are drawn with probability proportional to exp(-rate * r), where r is the expert's
popularity rank in that block (a seeded permutation per block, so the hot expert differs from
block to block and lands on different expert ranks). top_k distinct experts, equal weights.

Legend: T tokens, K top-k, E experts.
"""

from __future__ import annotations

import torch


class ExponentialSkew:
    def __init__(self, num_blocks: int, num_experts: int, top_k: int, rate: float, seed: int):
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"routing.top_k={top_k} must be in [1, {num_experts}]")
        g = torch.Generator().manual_seed(seed)
        decay_E = torch.exp(-rate * torch.arange(num_experts, dtype=torch.float64))
        # p_BE[b, e]: probability weight of expert e in block b.
        self.p_BE = torch.stack([decay_E[torch.argsort(torch.randperm(num_experts, generator=g))]
                                 for _ in range(num_blocks)]).float()
        self.top_k = top_k
        self.gen = torch.Generator().manual_seed(seed + 1)

    def probabilities(self, b: int) -> torch.Tensor:
        return self.p_BE[b] / self.p_BE[b].sum()

    def route(self, b: int, T: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        ids_TK = torch.multinomial(self.p_BE[b].expand(T, -1), self.top_k, replacement=False,
                                   generator=self.gen) if T else torch.zeros(0, self.top_k, dtype=torch.long)
        w_TK = torch.full((T, self.top_k), 1.0 / self.top_k, dtype=dtype)
        return ids_TK.to(device), w_TK.to(device)
