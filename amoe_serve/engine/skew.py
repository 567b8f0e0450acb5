"""Benchmark routing skew as in the AMoE paper: instead of the model's router, each token's
experts are drawn with probability proportional to exp(-rate * r), where r is the expert's
popularity rank in that block (a seeded permutation per block, so the hot expert differs from
block to block and lands on different expert ranks). top_k distinct experts, equal weights.

With affinity a > 0, a token follows its experts of the previous block with probability a:
expert e at block b-1 maps to the expert of the same popularity rank at block b. Each block's
expert popularity is unchanged, but consecutive blocks become correlated, the inter-layer
dependency MoETuner's placement exploits.

Legend: T tokens, K top-k, E experts.
"""

from __future__ import annotations

import torch


class ExponentialSkew:
    def __init__(self, num_blocks: int, num_experts: int, top_k: int, rate: float, seed: int,
                 affinity: float = 0.0, stream: int = 0):
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"routing.top_k={top_k} must be in [1, {num_experts}]")
        g = torch.Generator().manual_seed(seed)
        decay_E = torch.exp(-rate * torch.arange(num_experts, dtype=torch.float64))
        # rank_BE[b, e]: popularity rank of expert e in block b; p_BE its probability weight.
        rank_BE = torch.stack([torch.argsort(torch.randperm(num_experts, generator=g)) for _ in range(num_blocks)])
        self.p_BE = decay_E[rank_BE].float()
        # follow_BE[b, e]: the block-b expert with the popularity rank expert e had at block b-1.
        by_rank_BE = torch.argsort(rank_BE, dim=1)
        self.follow_BE = torch.stack([by_rank_BE[b][rank_BE[b - 1]] if b else torch.arange(num_experts)
                                      for b in range(num_blocks)])
        self.affinity = affinity
        self.top_k = top_k
        # Every attention rank shares the popularity (one model, one skew) but draws its own
        # tokens' experts: `stream` (the rank) only seeds the draws.
        self.gen = torch.Generator().manual_seed((seed + 1) * 1_000_003 + stream)

    def probabilities(self, b: int) -> torch.Tensor:
        return self.p_BE[b] / self.p_BE[b].sum()

    def route(self, b: int, T: int, dtype: torch.dtype, device,
              prev_TK: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ids_TK = torch.multinomial(self.p_BE[b].expand(T, -1), self.top_k, replacement=False,
                                   generator=self.gen) if T else torch.zeros(0, self.top_k, dtype=torch.long)
        if self.affinity > 0 and b > 0 and prev_TK is not None and T:
            follow_T = torch.rand(T, generator=self.gen) < self.affinity
            ids_TK[follow_T] = self.follow_BE[b][prev_TK.cpu()[follow_T]]
        w_TK = torch.full((T, self.top_k), 1.0 / self.top_k, dtype=dtype)
        return ids_TK.to(device), w_TK.to(device)
