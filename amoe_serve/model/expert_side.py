"""ExpertSide: the routed experts of some (block, expert) pairs; lives on expert ranks.

Legend: R=routed rows, D=hidden, F=expert ffn, E=experts held in a block, G=experts in a grouped call.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import torch

import amoe_kernels as K

from .checkpoint import ExpertReader, expert_name
from .spec import CheckpointError, ModelSpec


class ExpertSide:
    """Weights stacked per block (w1_EFD, w3_EFD, w2_EDF) so a grouped call indexes one stack.
    `compute_dtype` is the activations' dtype (rows in and out); None = the weights' dtype. fp32
    over bf16 weights at rest is widened per call by the kernels (amoe_kernels.upcast)."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], pairs: Iterable[tuple[int, int]],
                 where="checkpoint", compute_dtype: Optional[torch.dtype] = None):
        self.spec = spec
        self.pairs = _checked_pairs(spec, pairs)
        stacks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for b, experts in _by_block(self.pairs).items():
            per_w = []
            for w in ("w1", "w3", "w2"):
                names = [expert_name(b, e, w) for e in experts]
                missing = [n for n in names if n not in weights]
                if missing:
                    raise CheckpointError(f"{where}: missing expert tensors {missing[:3]}")
                per_w.append(torch.stack([weights[n] for n in names]))
            stacks[b] = (per_w[0], per_w[1], per_w[2])
        self._set(stacks, compute_dtype)

    @classmethod
    def load(
        cls,
        path: str | Path,
        spec: ModelSpec,
        dtype: Optional[torch.dtype],
        pairs: Iterable[tuple[int, int]],
        device: str | torch.device = "cpu",
        compute_dtype: Optional[torch.dtype] = None,
    ) -> "ExpertSide":
        """Each owned expert is read from the shards straight into its row of a preallocated
        stack: peak memory is the stacks (plus one expert when casting), and no other expert's
        bytes are read (`reader.reads` counts what was)."""
        self = cls.__new__(cls)
        self.spec = spec
        self.pairs = _checked_pairs(spec, pairs)
        self.reader = ExpertReader(path, spec)
        missing = [p for p in self.pairs if not self.reader.has(*p)]
        if missing:
            raise CheckpointError(f"{path}: missing expert tensors for {missing[:3]}")
        F, D = spec.expert_intermediate_size, spec.hidden_size
        stacks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        try:
            for b, experts in _by_block(self.pairs).items():
                stored = self.reader.dtype(b, experts[0])
                at_rest = stored if dtype is None else dtype
                E = len(experts)
                w1, w3, w2 = (torch.empty(E, F, D, dtype=at_rest), torch.empty(E, F, D, dtype=at_rest),
                              torch.empty(E, D, F, dtype=at_rest))
                for i, e in enumerate(experts):
                    if at_rest == stored:  # from the page cache straight into the stack rows
                        self.reader.read(b, e, out=(w1[i], w3[i], w2[i]))
                    else:  # cast as t.to(dtype) does: the same values
                        for dst, src in zip((w1, w3, w2), self.reader.read(b, e)):
                            dst[i].copy_(src)
                stacks[b] = (w1.to(device), w3.to(device), w2.to(device))
        finally:
            self.reader.close()
        self._set(stacks, compute_dtype)
        return self

    def _set(self, stacks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
             compute_dtype: Optional[torch.dtype]) -> None:
        by_block = _by_block(self.pairs)
        # Per block: expert id -> row in the stacked weights.
        self._index = {b: {e: i for i, e in enumerate(by_block[b])} for b in stacks}
        self._w1_EFD = {b: s[0] for b, s in stacks.items()}
        self._w3_EFD = {b: s[1] for b, s in stacks.items()}
        self._w2_EDF = {b: s[2] for b, s in stacks.items()}
        self._compute_dtype = compute_dtype
        self.bytes_loaded = sum(t.numel() * t.element_size() for s in stacks.values() for t in s)

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
        """The activations' dtype: rows arrive and leave in it."""
        return self._compute_dtype or self.weight_dtype

    @property
    def weight_dtype(self) -> torch.dtype:
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


def _checked_pairs(spec: ModelSpec, pairs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out = sorted({(int(b), int(e)) for b, e in pairs})
    for b, e in out:
        if not (0 <= b < spec.num_blocks and 0 <= e < spec.num_experts):
            raise ValueError(f"expert pair {(b, e)} out of range: {spec.num_blocks} blocks x {spec.num_experts} experts")
    return out


def _by_block(pairs: list[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for b, e in pairs:
        out.setdefault(b, []).append(e)
    return out
