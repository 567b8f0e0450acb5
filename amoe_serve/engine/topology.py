"""Which rank does what: rank 0 is the gateway, then A attention ranks, then E expert ranks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    attention_ranks: int
    expert_ranks: int

    @property
    def world_size(self) -> int:
        return 1 + self.attention_ranks + self.expert_ranks

    @property
    def attention(self) -> list[int]:
        return list(range(1, 1 + self.attention_ranks))

    @property
    def experts(self) -> list[int]:
        return list(range(1 + self.attention_ranks, self.world_size))

    def expert_rank(self, index: int) -> int:
        """World rank of the index-th expert rank."""
        return 1 + self.attention_ranks + index

    def role(self, rank: int) -> str:
        if rank == 0:
            return "gateway"
        if rank <= self.attention_ranks:
            return "attention"
        if rank < self.world_size:
            return "expert"
        raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
