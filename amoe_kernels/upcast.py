"""Weights at rest in bf16/fp16, compute in fp32: each weight is widened into a reused buffer
just before its GEMM, a slice at a time, so the fp32 copy never exists whole.

Why: this CPU has AVX2 and no AVX512-BF16/AMX, so torch's bf16 GEMM runs 1.5x (1 row) to 5x
(64 rows) slower than fp32, while widening bf16 is a shift at memory speed (docs/bench/fullsize).
The numbers are those of fp32 compute on the widened weights, exactly: widening is lossless, so
`reference` on `w.float()` is the definition (tests/kernels/test_upcast.py).

Legend: T rows, D in features, O out features, G stacked experts, F expert ffn.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as Fn


# Widened elements per slice: 4 MiB of fp32, about what a core's share of L3 holds.
SLICE_ELEMS = 1 << 20

_local = threading.local()


def _buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One growing scratch buffer per thread, dtype and device (the prefetch thread of Expert
    Buffering never calls kernels, but the gateway's threads may)."""
    key = (dtype, device)
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    b = bufs.get(key)
    if b is None or b.numel() < numel:
        b = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return b[:numel]


def linear(x_TD: torch.Tensor, w_OD: torch.Tensor, b_O: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b with w widened to x's dtype slice by slice of output rows."""
    O, D = w_OD.shape
    rows = max(1, SLICE_ELEMS // max(D, 1))
    if rows >= O:
        w = _buffer(O * D, x_TD.dtype, x_TD.device).view(O, D).copy_(w_OD)
        return Fn.linear(x_TD, w, None if b_O is None else b_O.to(x_TD.dtype))
    out_TO = torch.empty(*x_TD.shape[:-1], O, dtype=x_TD.dtype, device=x_TD.device)
    buf = _buffer(rows * D, x_TD.dtype, x_TD.device)
    for lo in range(0, O, rows):  # O / rows slices: 50 for a 50k-vocab head, not per token
        hi = min(O, lo + rows)
        w = buf[: (hi - lo) * D].view(hi - lo, D).copy_(w_OD[lo:hi])
        out_TO[..., lo:hi] = Fn.linear(x_TD, w)
    if b_O is not None:
        out_TO += b_O.to(x_TD.dtype)
    return out_TO


def expert_ffn(x_TD: torch.Tensor, w1_FD: torch.Tensor, w3_FD: torch.Tensor, w2_DF: torch.Tensor) -> torch.Tensor:
    return linear(Fn.silu(linear(x_TD, w1_FD)) * linear(x_TD, w3_FD), w2_DF)


def grouped_expert_ffn(x_TD: torch.Tensor, counts_G: list[int], w1_GFD: torch.Tensor, w3_GFD: torch.Tensor,
                       w2_GDF: torch.Tensor, experts: list[int] | None = None) -> torch.Tensor:
    """Expert by expert: its three weights widened into one reused buffer (25 MB for OLMoE's
    experts, so it stays in L3 between the widening and the GEMMs), then its rows' SwiGLU.
    Widening dominates at a few rows per expert, so one pass per weight and no allocation; the
    loop runs over the step's active experts (tens), never over tokens."""
    ids = range(len(counts_G)) if experts is None else experts
    y_TD = torch.empty_like(x_TD)
    F, D = w1_GFD.shape[1], w1_GFD.shape[2]
    buf = _buffer(3 * F * D, x_TD.dtype, x_TD.device)
    w1, w3, w2 = buf[:F * D].view(F, D), buf[F * D:2 * F * D].view(F, D), buf[2 * F * D:].view(D, F)
    start = 0
    for e, n in zip(ids, counts_G):
        if n:
            w1.copy_(w1_GFD[e])
            w3.copy_(w3_GFD[e])
            w2.copy_(w2_GDF[e])
            x = x_TD[start:start + n]
            y_TD[start:start + n] = Fn.linear(Fn.silu(Fn.linear(x, w1)) * Fn.linear(x, w3), w2)
        start += n
    return y_TD
