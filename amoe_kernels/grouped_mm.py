"""Grouped expert FFN on CPU through `torch._grouped_mm`: one GEMM call per weight for all of a
step's experts instead of three per expert. Bit-identical to `reference.grouped_expert_ffn`
(tests/kernels/test_grouped_mm.py), which stays the definition.

Legend: T rows (sorted by expert), D hidden, F expert ffn, G stacked experts.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as Fn


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """torch builds without a CPU _grouped_mm fall back to the per-expert loop."""
    return hasattr(torch, "_grouped_mm")


@functools.lru_cache(maxsize=None)
def supports(D: int, F: int, dtype: torch.dtype) -> bool:
    """Whether _grouped_mm takes these shapes (it wants 16-byte strides: D and F a multiple of
    16 bytes); tried once per shape, so an unsupported one costs nothing after that."""
    if not available():
        return False
    try:
        x_TD = torch.zeros(2, D, dtype=dtype)
        grouped_expert_ffn(x_TD, torch.tensor([2], dtype=torch.int32), torch.zeros(1, F, D, dtype=dtype),
                           torch.zeros(1, F, D, dtype=dtype), torch.zeros(1, D, F, dtype=dtype))
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def offsets(counts_G: list[int], experts: list[int] | None, num_stacked: int) -> torch.Tensor | None:
    """Group ends over the whole weight stack (experts absent from the step get 0 rows), or None
    when the step's experts are not in stack order (the caller then loops)."""
    if experts is None:
        full = counts_G
    else:
        if any(b <= a for a, b in zip(experts, experts[1:])):
            return None
        full = [0] * num_stacked
        for e, n in zip(experts, counts_G):
            full[e] = n
    ends, acc = [], 0
    for n in full:
        acc += n
        ends.append(acc)
    return torch.tensor(ends, dtype=torch.int32)


def grouped_expert_ffn(x_TD: torch.Tensor, offs_G: torch.Tensor, w1_GFD: torch.Tensor, w3_GFD: torch.Tensor,
                       w2_GDF: torch.Tensor) -> torch.Tensor:
    """SwiGLU of every group at once; weights go in as transposed views (no copy of the stacks)."""
    a_TF = Fn.silu(torch._grouped_mm(x_TD, w1_GFD.transpose(1, 2), offs=offs_G))
    a_TF = a_TF * torch._grouped_mm(x_TD, w3_GFD.transpose(1, 2), offs=offs_G)
    return torch._grouped_mm(a_TF, w2_GDF.transpose(1, 2), offs=offs_G)
