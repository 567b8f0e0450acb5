"""Expert placement: which expert rank(s) hold each (block, expert). Given as data so placement
policies (`amoe-serve place`: greedy, ILP, replicas) produce a file the data plane applies at
start-up.

File format (JSON, version 1):

    {"format": "amoe-placement", "version": 1,
     "expert_ranks": E,                      # optional; checked against the deployment when given
     "experts":  [[rank, ...] per block],    # primary rank of each expert, in [0, E)
     "replicas": [[[rank, ...] per expert] per block],   # optional extra ranks per expert
     "policy": "...", "meta": {...}}         # optional, informational

A replicated expert's tokens are split evenly across its ranks at dispatch (primary first).

Legend: B blocks, E experts per block, M most ranks holding one expert (1 + replicas).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from amoe_serve.jsonfile import read_json
from amoe_serve.errors import UserInputError

FORMAT = "amoe-placement"
VERSION = 1


class PlacementError(UserInputError, ValueError):
    pass


@dataclass(frozen=True)
class Placement:
    # rank_BE[b][e] = primary expert-rank index (0..expert_ranks-1) of expert e of block b.
    rank_BE: tuple[tuple[int, ...], ...]
    expert_ranks: int
    # replicas_BE[b][e] = further ranks holding a copy of expert e of block b; () = none anywhere.
    replicas_BE: tuple[tuple[tuple[int, ...], ...], ...] = ()

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
    def from_arrays(rank_BE: Any, expert_ranks: int,
                    replicas_BE: Optional[list[list[list[int]]]] = None) -> "Placement":
        rows = tuple(tuple(int(r) for r in row) for row in np.asarray(rank_BE).tolist())
        reps: tuple = ()
        if replicas_BE is not None and any(len(x) for row in replicas_BE for x in row):
            reps = tuple(tuple(tuple(int(r) for r in x) for x in row) for row in replicas_BE)
        return Placement(rows, expert_ranks, reps)

    @staticmethod
    def from_dict(data: Any, expert_ranks: int, where: str = "placement") -> "Placement":
        if not isinstance(data, dict) or "experts" not in data:
            raise PlacementError(f"{where}: expected an object with key 'experts'")
        if data.get("format", FORMAT) != FORMAT or data.get("version", VERSION) != VERSION:
            raise PlacementError(f"{where}: format {data.get('format')!r} version {data.get('version')!r} "
                                 f"is not {FORMAT!r} version {VERSION}")
        if "expert_ranks" in data and data["expert_ranks"] != expert_ranks:
            raise PlacementError(f"{where} was made for {data['expert_ranks']} expert ranks, "
                                 f"the deployment has {expert_ranks}")
        experts, replicas = data["experts"], data.get("replicas")
        if not isinstance(experts, list) or not all(isinstance(row, list) for row in experts):
            raise PlacementError(f"{where}: 'experts' must be a list of lists (ranks per block)")
        reps: tuple = ()
        if replicas is not None:
            ok = (isinstance(replicas, list) and all(isinstance(row, list) for row in replicas)
                  and all(isinstance(x, list) for row in replicas for x in row))
            if not ok:
                raise PlacementError(f"{where}: 'replicas' must be a list (blocks) of lists (experts) "
                                     "of lists (ranks)")
            reps = tuple(tuple(tuple(x) for x in row) for row in replicas)
        return Placement(tuple(tuple(row) for row in experts), expert_ranks, reps)

    @staticmethod
    def from_file(path: str | Path, num_blocks: int, num_experts: int, expert_ranks: int) -> "Placement":
        p = Placement.from_dict(read_json(path, "placement", PlacementError), expert_ranks, f"placement file {path}")
        p.validate(num_blocks, num_experts, f"placement file {path}")
        return p

    def validate(self, num_blocks: int, num_experts: int, where: str = "placement") -> None:
        E = self.expert_ranks
        if len(self.rank_BE) != num_blocks:
            raise PlacementError(f"{where} has {len(self.rank_BE)} blocks, model has {num_blocks}")
        for b, row in enumerate(self.rank_BE):
            if len(row) != num_experts:
                raise PlacementError(
                    f"{where} block {b} places {len(row)} experts, model has {num_experts}")
            for e, r in enumerate(row):
                if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < E:
                    raise PlacementError(f"{where} block {b} expert {e}: rank {r!r} is not in [0, {E})")
        if self.replicas_BE:
            if len(self.replicas_BE) != num_blocks or any(len(row) != num_experts for row in self.replicas_BE):
                raise PlacementError(f"{where}: 'replicas' must have {num_blocks} blocks of {num_experts} "
                                     "experts, like 'experts'")
            for b, row in enumerate(self.replicas_BE):
                for e, reps in enumerate(row):
                    for r in reps:
                        if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < E:
                            raise PlacementError(
                                f"{where} block {b} expert {e}: replica rank {r!r} is not in [0, {E})")
                    ranks = (self.rank_BE[b][e], *reps)
                    if len(set(ranks)) != len(ranks):
                        raise PlacementError(
                            f"{where} block {b} expert {e}: ranks {list(ranks)} repeat a rank "
                            "(a replica must live on another rank than the primary and the other replicas)")
        idle = sorted(set(range(E)) - {r for b in range(num_blocks) for e in range(num_experts)
                                       for r in self.ranks_of(b, e)})
        if idle:
            raise PlacementError(f"{where}: expert rank(s) {idle} hold no expert at all")

    # ---- queries ---------------------------------------------------------------------------
    def ranks_of(self, b: int, e: int) -> tuple[int, ...]:
        """Every rank holding expert e of block b, primary first."""
        reps = self.replicas_BE[b][e] if self.replicas_BE else ()
        return (self.rank_BE[b][e], *reps)

    @property
    def num_replicas(self) -> int:
        return sum(len(x) for row in self.replicas_BE for x in row)

    def pairs_of(self, expert_rank: int) -> list[tuple[int, int]]:
        """(block, expert) pairs held by one expert rank (as primary or replica), in order."""
        return [(b, e) for b, row in enumerate(self.rank_BE) for e in range(len(row))
                if expert_rank in self.ranks_of(b, e)]

    def owner_table(self) -> np.ndarray:
        return np.asarray(self.rank_BE, dtype=np.int64)

    def replica_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(n_BE, ranks_BEM): how many ranks hold each expert, and which (padded with the primary)."""
        B, E = len(self.rank_BE), len(self.rank_BE[0]) if self.rank_BE else 0
        n_BE = np.ones((B, E), dtype=np.int64)
        M = 1 + max((len(x) for row in self.replicas_BE for x in row), default=0)
        ranks_BEM = np.repeat(self.owner_table()[:, :, None], M, axis=2)
        for b, row in enumerate(self.replicas_BE):
            for e, reps in enumerate(row):
                n_BE[b, e] = 1 + len(reps)
                ranks_BEM[b, e, 1:1 + len(reps)] = reps
        return n_BE, ranks_BEM

    def to_dict(self, policy: Optional[str] = None, meta: Optional[dict] = None) -> dict:
        d: dict[str, Any] = {"format": FORMAT, "version": VERSION, "expert_ranks": self.expert_ranks,
                             "experts": [list(r) for r in self.rank_BE]}
        if self.replicas_BE:
            d["replicas"] = [[list(x) for x in row] for row in self.replicas_BE]
        if policy is not None:
            d["policy"] = policy
        if meta:
            d["meta"] = meta
        return d

    def to_json(self, policy: Optional[str] = None, meta: Optional[dict] = None) -> str:
        return json.dumps(self.to_dict(policy, meta))
