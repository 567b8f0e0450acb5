"""ExpertSide: the routed experts of some (block, expert) pairs; lives on expert ranks.

Legend: R=routed rows, D=hidden, F=expert ffn, E=experts held in a block, G=experts in a grouped call.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import torch

import amoe_kernels as K

from .checkpoint import expert_filter, expert_name, load_weights
from .spec import CheckpointError, ModelSpec


class ExpertSide:
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], pairs: Iterable[tuple[int, int]], where="checkpoint"):
        self.spec = spec
        self.pairs = sorted({(int(b), int(e)) for b, e in pairs})
        for b, e in self.pairs:
            if not (0 <= b < spec.num_blocks and 0 <= e < spec.num_experts):
                raise ValueError(f"expert pair {(b, e)} out of range: {spec.num_blocks} blocks x {spec.num_experts} experts")
        # Per block: expert id -> row in the stacked weights (stacked so grouped calls index once).
        self._index: dict[int, dict[int, int]] = {}
        self._w1_EFD: dict[int, torch.Tensor] = {}
        self._w3_EFD: dict[int, torch.Tensor] = {}
        self._w2_EDF: dict[int, torch.Tensor] = {}
        for b in sorted({b for b, _ in self.pairs}):
            experts = [e for bb, e in self.pairs if bb == b]
            stacks = []
            for w in ("w1", "w3", "w2"):
                names = [expert_name(b, e, w) for e in experts]
                missing = [n for n in names if n not in weights]
                if missing:
                    raise CheckpointError(f"{where}: missing expert tensors {missing[:3]}")
                stacks.append(torch.stack([weights[n] for n in names]))
            self._index[b] = {e: i for i, e in enumerate(experts)}
            self._w1_EFD[b], self._w3_EFD[b], self._w2_EDF[b] = stacks

    @classmethod
    def load(
        cls,
        path: str | Path,
        spec: ModelSpec,
        dtype: Optional[torch.dtype],
        pairs: Iterable[tuple[int, int]],
        device: str | torch.device = "cpu",
    ) -> "ExpertSide":
        pairs = list(pairs)
        weights = load_weights(path, spec, dtype, expert_filter(pairs))
        return cls(spec, {n: t.to(device) for n, t in weights.items()}, pairs, str(path))

    def _rows(self, b: int, experts: list[int]) -> list[int]:
        held = self._index.get(b, {})
        try:
            return [held[e] for e in experts]
        except KeyError as exc:
            raise ValueError(f"expert ({b}, {exc.args[0]}) is not held by this ExpertSide") from None

    @torch.inference_mode()
    def run(self, b: int, e: int, y_RD: torch.Tensor) -> torch.Tensor:
        (i,) = self._rows(b, [e])
        return K.expert_ffn(y_RD, self._w1_EFD[b][i], self._w3_EFD[b][i], self._w2_EDF[b][i])

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._w1_EFD.values())).dtype

    @torch.inference_mode()
    def run_grouped(self, b: int, experts: list[int], counts: list[int], y_RD: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert; one grouped call for all of them (one launch on a GPU). The
        stacked weights are selected by row index, never copied."""
        rows = self._rows(b, list(experts))
        if sum(counts) != y_RD.shape[0]:
            raise ValueError(f"counts sum to {sum(counts)} but {y_RD.shape[0]} rows were given")
        return K.grouped_expert_ffn(y_RD, list(counts), self._w1_EFD[b], self._w3_EFD[b], self._w2_EDF[b],
                                    experts=rows)
