"""Shape/dtype validation shared by every backend; raises ValueError with a clear message."""

from __future__ import annotations

import torch


def _fail(op: str, msg: str) -> None:
    raise ValueError(f"{op}: {msg}")


def _dims(op: str, name: str, t: torch.Tensor, n: int) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != n:
        _fail(op, f"{name} must have {n} dims, got shape {tuple(t.shape)}")


def _float(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        _fail(op, f"{name} must be floating point, got {t.dtype}")


def expert_ffn(x_TD, w1_FD, w3_FD, w2_DF) -> None:
    op = "expert_ffn"
    for n, t, d in (("x_TD", x_TD, 2), ("w1_FD", w1_FD, 2), ("w3_FD", w3_FD, 2), ("w2_DF", w2_DF, 2)):
        _dims(op, n, t, d)
        _float(op, n, t)
    T, D = x_TD.shape
    F = w1_FD.shape[0]
    if w1_FD.shape != (F, D) or w3_FD.shape != (F, D) or w2_DF.shape != (D, F):
        _fail(op, f"weights w1 {tuple(w1_FD.shape)}, w3 {tuple(w3_FD.shape)}, w2 {tuple(w2_DF.shape)} "
                  f"do not match x {tuple(x_TD.shape)}: expected w1/w3 [F, {D}], w2 [{D}, F]")
    if len({x_TD.dtype, w1_FD.dtype, w3_FD.dtype, w2_DF.dtype}) != 1:
        _fail(op, f"dtypes differ: x {x_TD.dtype}, w1 {w1_FD.dtype}, w3 {w3_FD.dtype}, w2 {w2_DF.dtype}")


def grouped_expert_ffn(x_TD, counts_G, w1_GFD, w3_GFD, w2_GDF) -> None:
    op = "grouped_expert_ffn"
    _dims(op, "x_TD", x_TD, 2)
    for n, t in (("w1_GFD", w1_GFD), ("w3_GFD", w3_GFD), ("w2_GDF", w2_GDF)):
        _dims(op, n, t, 3)
    T, D = x_TD.shape
    G, F = w1_GFD.shape[0], w1_GFD.shape[1]
    if w1_GFD.shape != (G, F, D) or w3_GFD.shape != (G, F, D) or w2_GDF.shape != (G, D, F):
        _fail(op, f"weights w1 {tuple(w1_GFD.shape)}, w3 {tuple(w3_GFD.shape)}, w2 {tuple(w2_GDF.shape)} "
                  f"do not match x {tuple(x_TD.shape)}: expected w1/w3 [G, F, {D}], w2 [G, {D}, F]")
    if len(counts_G) != G:
        _fail(op, f"{len(counts_G)} counts for {G} experts")
    if any(int(c) < 0 for c in counts_G) or sum(int(c) for c in counts_G) != T:
        _fail(op, f"counts {list(counts_G)} must be >= 0 and sum to T={T}")
    if len({x_TD.dtype, w1_GFD.dtype, w3_GFD.dtype, w2_GDF.dtype}) != 1:
        _fail(op, "x and weights must share one dtype")


def topk_gating(logits_TE, k) -> None:
    op = "topk_gating"
    _dims(op, "logits_TE", logits_TE, 2)
    _float(op, "logits_TE", logits_TE)
    if not 1 <= k <= logits_TE.shape[1]:
        _fail(op, f"k={k} must be in [1, E={logits_TE.shape[1]}]")


def permute(ids_TK, num_experts) -> None:
    op = "permute"
    _dims(op, "ids_TK", ids_TK, 2)
    if ids_TK.dtype not in (torch.int64, torch.int32):
        _fail(op, f"ids_TK must be int64/int32, got {ids_TK.dtype}")
    if ids_TK.numel() and (int(ids_TK.min()) < 0 or int(ids_TK.max()) >= num_experts):
        _fail(op, f"expert ids must be in [0, {num_experts})")


def combine_slots(out_TKD, w_TK) -> None:
    op = "combine_slots"
    _dims(op, "out_TKD", out_TKD, 3)
    _dims(op, "w_TK", w_TK, 2)
    if tuple(out_TKD.shape[:2]) != tuple(w_TK.shape):
        _fail(op, f"out_TKD {tuple(out_TKD.shape)} and w_TK {tuple(w_TK.shape)} disagree on [T, K]")


def unpermute_combine(out_sorted_RD, order_R, w_TK) -> None:
    op = "unpermute_combine"
    _dims(op, "out_sorted_RD", out_sorted_RD, 2)
    _dims(op, "order_R", order_R, 1)
    _dims(op, "w_TK", w_TK, 2)
    if out_sorted_RD.shape[0] != order_R.shape[0] or order_R.shape[0] != w_TK.numel():
        _fail(op, f"R mismatch: out {out_sorted_RD.shape[0]}, order {order_R.shape[0]}, T*K {w_TK.numel()}")
