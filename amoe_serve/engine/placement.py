"""Expert placement: which expert rank holds each (block, expert). Given as data so placement
policies (greedy, ILP, replicas) can produce a file the data plane applies at start-up."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class PlacementError(ValueError):
    pass


@dataclass(frozen=True)
class Placement:
    # rank_BE[b][e] = expert-rank index (0..expert_ranks-1) that owns expert e of block b.
    rank_BE: tuple[tuple[int, ...], ...]
    expert_ranks: int

    @staticmethod
    def contiguous(num_blocks: int, num_experts: int, expert_ranks: int) -> "Placement":
        if expert_ranks > num_experts:
            raise PlacementError(
                f"{expert_ranks} expert ranks but the model has only {num_experts} experts "
                "per block: some ranks would own nothing")
        # Experts split into contiguous, nearly equal ranges (the first ranks take the extras).
        owner = np.repeat(np.arange(expert_ranks), [len(a) for a in
                                                   np.array_split(np.arange(num_experts), expert_ranks)])
        return Placement(tuple(tuple(int(r) for r in owner) for _ in range(num_blocks)), expert_ranks)

    @staticmethod
    def from_file(path: str | Path, num_blocks: int, num_experts: int, expert_ranks: int) -> "Placement":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlacementError(f"placement file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise PlacementError(f"placement file {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or "experts" not in data:
            raise PlacementError(f"placement file {path}: expected an object with key 'experts'")
        p = Placement(tuple(tuple(row) for row in data["experts"]), expert_ranks)
        p.validate(num_blocks, num_experts)
        return p

    def validate(self, num_blocks: int, num_experts: int) -> None:
        if len(self.rank_BE) != num_blocks:
            raise PlacementError(f"placement has {len(self.rank_BE)} blocks, model has {num_blocks}")
        for b, row in enumerate(self.rank_BE):
            if len(row) != num_experts:
                raise PlacementError(
                    f"placement block {b} places {len(row)} experts, model has {num_experts}")
            for e, r in enumerate(row):
                if not isinstance(r, int) or not 0 <= r < self.expert_ranks:
                    raise PlacementError(
                        f"placement block {b} expert {e}: rank {r!r} is not in [0, {self.expert_ranks})")

    def pairs_of(self, expert_rank: int) -> list[tuple[int, int]]:
        """(block, expert) pairs owned by one expert rank, in (block, expert) order."""
        return [(b, e) for b, row in enumerate(self.rank_BE) for e, r in enumerate(row) if r == expert_rank]

    def owner_table(self) -> np.ndarray:
        return np.asarray(self.rank_BE, dtype=np.int64)

    def to_json(self) -> str:
        return json.dumps({"experts": [list(r) for r in self.rank_BE]})
