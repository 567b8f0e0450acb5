"""Triton kernels for the MoE operators (grouped SwiGLU FFN, gating/routing, permute, combine).

Imported only by the dispatcher when Triton is used (CUDA tensors, or backend="triton" under
TRITON_INTERPRET=1 for tests). Every launcher takes already-checked arguments (see checks.py)
and returns the same layout as the reference in reference.py.
Legend: T=tokens, D=hidden, F=expert ffn, E=experts, K=top-k slots, G=experts in a group,
R=T*K routed rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning


def _np2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(1, int(n))))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (the reference is fp32); fp16/bf16 ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------------------------
# Grouped expert FFN (SwiGLU): y = w2(silu(x w1^T) * (x w3^T)), rows sorted by expert.
# One launch per GEMM for all experts: the grid's first axis enumerates (expert, row-tile)
# pairs (a tile never straddles two experts, so empty experts get no tiles), the second axis
# tiles the output columns. fp32 accumulation; intermediates rounded to the activation dtype
# where the reference rounds them.
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_rows(tiles_ptr, num_tiles, BLOCK_M: tl.constexpr):
    """This program's (expert, its rows, row mask) from the tile table [expert | row0 | row_end]."""
    tile = tl.program_id(0)
    g = tl.load(tiles_ptr + tile).to(tl.int64)
    row0 = tl.load(tiles_ptr + num_tiles + tile)
    row_end = tl.load(tiles_ptr + 2 * num_tiles + tile)
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    return g, rows, rows < row_end


@triton.jit
def _ffn_gate_up_kernel(
    x_ptr, w1_ptr, w3_ptr, h_ptr, tiles_ptr, num_tiles,
    F, D,
    sx_t, sx_d, sw_g, sw_f, sw_d, sh_t, sh_f,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    g, rows, rmask = _tile_rows(tiles_ptr, num_tiles, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < F
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w1_base = w1_ptr + g * sw_g + cols[None, :] * sw_f
    w3_base = w3_ptr + g * sw_g + cols[None, :] * sw_f
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        x = tl.load(x_ptr + rows[:, None] * sx_t + ks[None, :] * sx_d, mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & cmask[None, :]
        w1 = tl.load(w1_base + ks[:, None] * sw_d, mask=wmask, other=0.0)
        w3 = tl.load(w3_base + ks[:, None] * sw_d, mask=wmask, other=0.0)
        acc1 = tl.dot(x, w1, acc1, input_precision=DOT_PREC)
        acc3 = tl.dot(x, w3, acc3, input_precision=DOT_PREC)
    out_ty = h_ptr.dtype.element_ty
    a = acc1.to(out_ty).to(tl.float32)
    u = acc3.to(out_ty).to(tl.float32)
    act = (a * tl.sigmoid(a)).to(out_ty).to(tl.float32)
    h = (act * u).to(out_ty)
    tl.store(h_ptr + rows[:, None] * sh_t + cols[None, :] * sh_f, h, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _ffn_down_kernel(
    h_ptr, w2_ptr, y_ptr, tiles_ptr, num_tiles,
    D, F,
    sh_t, sh_f, sw_g, sw_d, sw_f, sy_t, sy_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    g, rows, rmask = _tile_rows(tiles_ptr, num_tiles, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w2_ptr + g * sw_g + cols[None, :] * sw_d
    for k0 in range(0, F, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < F
        h = tl.load(h_ptr + rows[:, None] * sh_t + ks[None, :] * sh_f, mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_base + ks[:, None] * sw_f, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=DOT_PREC)
    tl.store(y_ptr + rows[:, None] * sy_t + cols[None, :] * sy_d, acc.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def _tile_schedule(counts_G: list[int], block_m: int, device, experts=None) -> tuple[torch.Tensor, int]:
    """[3, num_tiles] int32: weight row (expert), first row, end row (exclusive) of each row tile."""
    exp, start, end = [], [], []
    off = 0
    for g, n in enumerate(counts_G):
        for s in range(off, off + n, block_m):
            exp.append(g if experts is None else experts[g])
            start.append(s)
            end.append(off + n)
        off += n
    tiles = torch.tensor([exp, start, end], dtype=torch.int32)
    if device.type == "cuda":
        tiles = tiles.pin_memory().to(device, non_blocking=True)
    return tiles, len(exp)


def grouped_expert_ffn(x_TD, counts_G, w1_GFD, w3_GFD, w2_GDF, cfg: dict | None = None, experts=None):
    T, D = x_TD.shape
    F = w1_GFD.shape[1]
    y_TD = torch.empty_like(x_TD)
    if T == 0:
        return y_TD
    busy = sum(1 for c in counts_G if c) or 1
    cfg = cfg or tuning.config("grouped_expert_ffn", x_TD.device, m=-(-T // busy))
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if w1_GFD.stride() != w3_GFD.stride():
        w1_GFD, w3_GFD = w1_GFD.contiguous(), w3_GFD.contiguous()
    tiles, n_tiles = _tile_schedule(counts_G, BM, x_TD.device, experts)
    prec = _dot_precision(x_TD.dtype)
    h_TF = torch.empty(T, F, dtype=x_TD.dtype, device=x_TD.device)
    _ffn_gate_up_kernel[(n_tiles, triton.cdiv(F, BN))](
        x_TD, w1_GFD, w3_GFD, h_TF, tiles, n_tiles, F, D,
        x_TD.stride(0), x_TD.stride(1), w1_GFD.stride(0), w1_GFD.stride(1), w1_GFD.stride(2),
        h_TF.stride(0), h_TF.stride(1),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, DOT_PREC=prec, **launch,
    )
    _ffn_down_kernel[(n_tiles, triton.cdiv(D, BN))](
        h_TF, w2_GDF, y_TD, tiles, n_tiles, D, F,
        h_TF.stride(0), h_TF.stride(1), w2_GDF.stride(0), w2_GDF.stride(1), w2_GDF.stride(2),
        y_TD.stride(0), y_TD.stride(1),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, DOT_PREC=prec, **launch,
    )
    return y_TD


# --------------------------------------------------------------------------------------------
# Gating: scores (softmax or sigmoid, fp32) -> top-k -> optional renormalisation.
# --------------------------------------------------------------------------------------------


@triton.jit
def _topk_rows(logits_ptr, sl_t, sl_e, t0, T, E,
               K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
               SIGMOID: tl.constexpr, RENORM: tl.constexpr):
    """Top-k of BLOCK_T rows starting at t0: (ids [BT, BK] int32, w [BT, BK] fp32, tmask,
    presence [BT, BE] int32 = 1 where the row picked that expert)."""
    ts = t0 + tl.arange(0, BLOCK_T)
    tmask = ts < T
    es = tl.arange(0, BLOCK_E)
    emask = es < E
    x = tl.load(logits_ptr + ts[:, None].to(tl.int64) * sl_t + es[None, :] * sl_e,
                mask=tmask[:, None] & emask[None, :], other=float("-inf")).to(tl.float32)
    x = tl.where(tmask[:, None], x, 0.0)  # padded rows: finite, never stored
    if SIGMOID:
        p = tl.sigmoid(x)
    else:
        m = tl.max(x, axis=1)
        num = tl.exp(x - m[:, None])
        p = num / tl.sum(num, axis=1)[:, None]
    sel = tl.where(emask[None, :], p, float("-inf"))
    ks = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    presence = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.max(sel, axis=1)
        # first column holding the max (torch.topk order for distinct values)
        idx = tl.min(tl.where(sel == best[:, None], es[None, :], BLOCK_E), axis=1)
        hit = es[None, :] == idx[:, None]
        sel = tl.where(hit, float("-inf"), sel)
        presence = tl.where(hit, 1, presence)
        ids = tl.where(ks[None, :] == j, idx[:, None], ids)
        w = tl.where(ks[None, :] == j, best[:, None], w)
    if RENORM:
        w = w / tl.sum(w, axis=1)[:, None]
    presence = tl.where(tmask[:, None], presence, 0)
    return ids, w, tmask, presence


@triton.jit
def _topk_gating_kernel(
    logits_ptr, w_ptr, ids_ptr, T, E, sl_t, sl_e,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    SIGMOID: tl.constexpr, RENORM: tl.constexpr,
):
    t0 = tl.program_id(0) * BLOCK_T
    ids, w, tmask, _ = _topk_rows(logits_ptr, sl_t, sl_e, t0, T, E, K, BLOCK_T, BLOCK_E, BLOCK_K, SIGMOID, RENORM)
    ts = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    m = tmask[:, None] & (ks[None, :] < K)
    tl.store(w_ptr + ts[:, None] * K + ks[None, :], w.to(w_ptr.dtype.element_ty), mask=m)
    tl.store(ids_ptr + ts[:, None] * K + ks[None, :], ids.to(tl.int64), mask=m)


@triton.jit
def _route_kernel(
    logits_ptr, w_ptr, ids_ptr, order_ptr, counts_ptr, T, E, sl_t, sl_e,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    SIGMOID: tl.constexpr, RENORM: tl.constexpr,
):
    """Gating + counts + stable expert order in one single-program launch.

    Pass 1 counts rows per expert; pass 2 recomputes the (deterministic) top-k, writes weights
    and ids, and places row t*K+j at offsets[e] + (earlier tokens that picked e): a stable
    counting sort, since one token picks an expert at most once."""
    es = tl.arange(0, BLOCK_E)
    ks = tl.arange(0, BLOCK_K)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        _, _, _, presence = _topk_rows(logits_ptr, sl_t, sl_e, t0, T, E, K, BLOCK_T, BLOCK_E, BLOCK_K, SIGMOID, RENORM)
        counts += tl.sum(presence, axis=0)
    tl.store(counts_ptr + es, counts.to(tl.int64), mask=es < E)
    running = tl.cumsum(counts, axis=0) - counts  # exclusive offsets
    for t0 in range(0, T, BLOCK_T):
        ids, w, tmask, presence = _topk_rows(logits_ptr, sl_t, sl_e, t0, T, E, K, BLOCK_T, BLOCK_E, BLOCK_K, SIGMOID, RENORM)
        ts = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        m = tmask[:, None] & (ks[None, :] < K)
        tl.store(w_ptr + ts[:, None] * K + ks[None, :], w.to(w_ptr.dtype.element_ty), mask=m)
        tl.store(ids_ptr + ts[:, None] * K + ks[None, :], ids.to(tl.int64), mask=m)
        pos_TE = running[None, :] + tl.cumsum(presence, axis=0) - presence
        for j in tl.static_range(K):
            e_j = tl.sum(tl.where(ks[None, :] == j, ids, 0), axis=1)
            pos = tl.sum(tl.where(es[None, :] == e_j[:, None], pos_TE, 0), axis=1)
            tl.store(order_ptr + pos, ts * K + j, mask=tmask)
        running += tl.sum(presence, axis=0)


def _gating_meta(logits_TE, k):
    T, E = logits_TE.shape
    return T, E, _np2(E), _np2(k)


def topk_gating(logits_TE, k, renormalize, weight_dtype=None, scoring="softmax"):
    T, E, BE, BK = _gating_meta(logits_TE, k)
    dev = logits_TE.device
    w_TK = torch.empty(T, k, dtype=weight_dtype or torch.float32, device=dev)
    ids_TK = torch.empty(T, k, dtype=torch.int64, device=dev)
    if T:
        cfg = tuning.config("topk_gating", dev)
        BT = cfg["BLOCK_T"]
        _topk_gating_kernel[(triton.cdiv(T, BT),)](
            logits_TE, w_TK, ids_TK, T, E, logits_TE.stride(0), logits_TE.stride(1),
            K=k, BLOCK_T=BT, BLOCK_E=BE, BLOCK_K=BK, SIGMOID=scoring == "sigmoid", RENORM=bool(renormalize),
            num_warps=cfg["num_warps"],
        )
    return w_TK, ids_TK


def route(logits_TE, k, renormalize, num_experts, weight_dtype=None, scoring="softmax"):
    T, E, BE, BK = _gating_meta(logits_TE, k)
    dev = logits_TE.device
    w_TK = torch.empty(T, k, dtype=weight_dtype or torch.float32, device=dev)
    ids_TK = torch.empty(T, k, dtype=torch.int64, device=dev)
    order_R = torch.empty(T * k, dtype=torch.int64, device=dev)
    counts_E = torch.empty(num_experts, dtype=torch.int64, device=dev)
    cfg = tuning.config("route", dev)
    _route_kernel[(1,)](
        logits_TE, w_TK, ids_TK, order_R, counts_E, T, E, logits_TE.stride(0), logits_TE.stride(1),
        K=k, BLOCK_T=cfg["BLOCK_T"], BLOCK_E=BE, BLOCK_K=BK, SIGMOID=scoring == "sigmoid",
        RENORM=bool(renormalize), num_warps=cfg["num_warps"],
    )
    return w_TK, ids_TK, order_R, counts_E


# --------------------------------------------------------------------------------------------
# Permute: stable sort of routed rows by expert (any ids, repeats allowed), and the gather.
# --------------------------------------------------------------------------------------------


@triton.jit
def _permute_kernel(ids_ptr, order_ptr, counts_ptr, R, E, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """Single program, two passes: histogram, then rank = offset[e] + earlier rows with id e."""
    es = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for r0 in range(0, R, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        ids = tl.load(ids_ptr + rs, mask=rs < R, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == es[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + es, counts.to(tl.int64), mask=es < E)
    running = tl.cumsum(counts, axis=0) - counts
    for r0 in range(0, R, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        rmask = rs < R
        ids = tl.load(ids_ptr + rs, mask=rmask, other=-1).to(tl.int32)
        onehot = (ids[:, None] == es[None, :]).to(tl.int32)
        rank = running[None, :] + tl.cumsum(onehot, axis=0) - onehot
        pos = tl.sum(onehot * rank, axis=1)
        tl.store(order_ptr + pos, rs.to(tl.int64), mask=rmask)
        running += tl.sum(onehot, axis=0)


def permute(ids_TK, num_experts):
    R = ids_TK.numel()
    dev = ids_TK.device
    order_R = torch.empty(R, dtype=torch.int64, device=dev)
    counts_E = torch.empty(num_experts, dtype=torch.int64, device=dev)
    if num_experts == 0:
        return order_R, counts_E
    cfg = tuning.config("permute", dev)
    _permute_kernel[(1,)](
        ids_TK.reshape(-1).contiguous(), order_R, counts_E, R, num_experts,
        BLOCK_R=cfg["BLOCK_R"], BLOCK_E=_np2(num_experts), num_warps=cfg["num_warps"],
    )
    return order_R, counts_E


@triton.jit
def _gather_rows_kernel(x_ptr, order_ptr, y_ptr, R, D, K, sx_t, sy_r,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rs < R
    m = rmask[:, None] & (ds[None, :] < D)
    src = tl.load(order_ptr + rs, mask=rmask, other=0).to(tl.int64) // K
    v = tl.load(x_ptr + src[:, None] * sx_t + ds[None, :], mask=m)
    tl.store(y_ptr + rs[:, None].to(tl.int64) * sy_r + ds[None, :], v, mask=m)


def permute_tokens(x_TD, order_R, k):
    x_TD = x_TD if x_TD.stride(1) == 1 else x_TD.contiguous()
    R, D = order_R.shape[0], x_TD.shape[1]
    y_RD = torch.empty(R, D, dtype=x_TD.dtype, device=x_TD.device)
    if R and D:
        cfg = tuning.config("permute_tokens", x_TD.device)
        BR, BD = cfg["BLOCK_R"], min(cfg["BLOCK_D"], _np2(D, 16))
        _gather_rows_kernel[(triton.cdiv(R, BR), triton.cdiv(D, BD))](
            x_TD, order_R, y_RD, R, D, k, x_TD.stride(0), y_RD.stride(0),
            BLOCK_R=BR, BLOCK_D=BD, num_warps=cfg["num_warps"],
        )
    return y_RD


# --------------------------------------------------------------------------------------------
# Combine: y[t] = sum_k w[t,k] * out[row(t,k)] in slot order, fp32 sum (reference numerics:
# the product is rounded to torch's promoted dtype when that is fp16/bf16).
# --------------------------------------------------------------------------------------------


@triton.jit
def _invert_kernel(order_ptr, inv_ptr, R, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < R
    r = tl.load(order_ptr + i, mask=m, other=0)
    tl.store(inv_ptr + r, i.to(tl.int64), mask=m)


@triton.jit
def _combine_kernel(out_ptr, inv_ptr, w_ptr, y_ptr, T, D, so_r, sw_t, sw_k, sy_t,
                    K: tl.constexpr, HAS_INV: tl.constexpr, ROUND_PROD: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    ts = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tmask = ts < T
    m = tmask[:, None] & (ds[None, :] < D)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(K):
        if HAS_INV:
            row = tl.load(inv_ptr + ts * K + j, mask=tmask, other=0)
        else:
            row = ts * K + j
        o = tl.load(out_ptr + row[:, None] * so_r + ds[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ts * sw_t + j * sw_k, mask=tmask, other=0.0).to(tl.float32)
        p = o * w[:, None]
        if ROUND_PROD:
            p = p.to(y_ptr.dtype.element_ty).to(tl.float32)
        acc += p
    tl.store(y_ptr + ts[:, None] * sy_t + ds[None, :], acc.to(y_ptr.dtype.element_ty), mask=m)


def _combine(out_RD, inv_R, w_TK):
    T, K = w_TK.shape
    D = out_RD.shape[1]
    out_RD = out_RD if out_RD.stride(1) == 1 else out_RD.contiguous()
    y_TD = torch.empty(T, D, dtype=out_RD.dtype, device=out_RD.device)
    if T == 0 or D == 0:
        return y_TD
    prod = torch.promote_types(out_RD.dtype, w_TK.dtype)
    cfg = tuning.config("unpermute_combine", out_RD.device)
    BT, BD = cfg["BLOCK_T"], min(cfg["BLOCK_D"], _np2(D, 16))
    _combine_kernel[(triton.cdiv(T, BT), triton.cdiv(D, BD))](
        out_RD, inv_R if inv_R is not None else out_RD, w_TK, y_TD, T, D,
        out_RD.stride(0), w_TK.stride(0), w_TK.stride(1), y_TD.stride(0),
        K=K, HAS_INV=inv_R is not None, ROUND_PROD=prod in (torch.float16, torch.bfloat16) and prod == out_RD.dtype,
        BLOCK_T=BT, BLOCK_D=BD, num_warps=cfg["num_warps"],
    )
    return y_TD


def unpermute_combine(out_sorted_RD, order_R, w_TK):
    R = order_R.shape[0]
    inv_R = torch.empty(R, dtype=torch.int64, device=order_R.device)
    if R:
        _invert_kernel[(triton.cdiv(R, 1024),)](order_R, inv_R, R, BLOCK=1024)
    return _combine(out_sorted_RD, inv_R, w_TK)


def combine_slots(out_TKD, w_TK):
    T, K, D = out_TKD.shape
    return _combine(out_TKD.reshape(T * K, D), None, w_TK)
