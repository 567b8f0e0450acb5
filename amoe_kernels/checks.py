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
    if len({w1_FD.dtype, w3_FD.dtype, w2_DF.dtype}) != 1 or not _computable(x_TD.dtype, w1_FD.dtype):
        _fail(op, f"dtypes differ: x {x_TD.dtype}, w1 {w1_FD.dtype}, w3 {w3_FD.dtype}, w2 {w2_DF.dtype}")


def grouped_expert_ffn(x_TD, counts_G, w1_GFD, w3_GFD, w2_GDF, experts=None) -> None:
    op = "grouped_expert_ffn"
    _dims(op, "x_TD", x_TD, 2)
    for n, t in (("w1_GFD", w1_GFD), ("w3_GFD", w3_GFD), ("w2_GDF", w2_GDF)):
        _dims(op, n, t, 3)
    T, D = x_TD.shape
    G, F = w1_GFD.shape[0], w1_GFD.shape[1]
    if w1_GFD.shape != (G, F, D) or w3_GFD.shape != (G, F, D) or w2_GDF.shape != (G, D, F):
        _fail(op, f"weights w1 {tuple(w1_GFD.shape)}, w3 {tuple(w3_GFD.shape)}, w2 {tuple(w2_GDF.shape)} "
                  f"do not match x {tuple(x_TD.shape)}: expected w1/w3 [G, F, {D}], w2 [G, {D}, F]")
    if experts is not None:
        if len(experts) != len(counts_G):
            _fail(op, f"{len(counts_G)} counts for {len(experts)} experts")
        if any(not 0 <= int(e) < G for e in experts):
            _fail(op, f"experts {list(experts)} must index the {G} stacked weights")
    elif len(counts_G) != G:
        _fail(op, f"{len(counts_G)} counts for {G} experts")
    if any(int(c) < 0 for c in counts_G) or sum(int(c) for c in counts_G) != T:
        _fail(op, f"counts {list(counts_G)} must be >= 0 and sum to T={T}")
    if len({w1_GFD.dtype, w3_GFD.dtype, w2_GDF.dtype}) != 1 or not _computable(x_TD.dtype, w1_GFD.dtype):
        _fail(op, f"x ({x_TD.dtype}) and weights ({w1_GFD.dtype}) must share one dtype, or x be float32 "
                  "over bf16/fp16 weights")


def _computable(x_dtype: torch.dtype, w_dtype: torch.dtype) -> bool:
    """Same dtype, or fp32 activations over narrower weights at rest (widened per call)."""
    return x_dtype == w_dtype or (x_dtype == torch.float32 and w_dtype in (torch.bfloat16, torch.float16))


def linear(x_TD, w_OD, b_O=None) -> None:
    op = "linear"
    _dims(op, "w_OD", w_OD, 2)
    _float(op, "x_TD", x_TD)
    if x_TD.shape[-1] != w_OD.shape[1]:
        _fail(op, f"x {tuple(x_TD.shape)} and w {tuple(w_OD.shape)}: in features differ")
    if b_O is not None and tuple(b_O.shape) != (w_OD.shape[0],):
        _fail(op, f"bias {tuple(b_O.shape)} must be [{w_OD.shape[0]}]")
    if not _computable(x_TD.dtype, w_OD.dtype):
        _fail(op, f"x ({x_TD.dtype}) and w ({w_OD.dtype}) must share one dtype, or x be float32 over bf16/fp16 w")


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


def rms_norm(x_TD, w_D) -> None:
    op = "rms_norm"
    _dims(op, "w_D", w_D, 1)
    if x_TD.dim() < 1 or x_TD.shape[-1] != w_D.shape[0]:
        _fail(op, f"x {tuple(x_TD.shape)} does not end in the weight's size {w_D.shape[0]}")


def moe_combine(h_TD, out_TKD, w_TK) -> None:
    combine_slots(out_TKD, w_TK)
    _dims("moe_combine", "h_TD", h_TD, 2)
    if h_TD.shape[0] != out_TKD.shape[0] or h_TD.shape[1] != out_TKD.shape[2]:
        _fail("moe_combine", f"h_TD {tuple(h_TD.shape)} and out_TKD {tuple(out_TKD.shape)} disagree on [T, D]")


def rope_kv_write(qkv_TX, cos_Td, sin_Td, H: int, G: int, slots_T, k_XGd, v_XGd) -> None:
    op = "rope_kv_write"
    for name, t, n in (("qkv_TX", qkv_TX, 2), ("cos_Td", cos_Td, 2), ("sin_Td", sin_Td, 2), ("slots_T", slots_T, 1),
                       ("k_XGd", k_XGd, 3), ("v_XGd", v_XGd, 3)):
        _dims(op, name, t, n)
    T, d = qkv_TX.shape[0], k_XGd.shape[2]
    if k_XGd.shape != v_XGd.shape or k_XGd.shape[1] != G or qkv_TX.shape[1] != (H + 2 * G) * d:
        _fail(op, f"qkv {tuple(qkv_TX.shape)}, caches {tuple(k_XGd.shape)}/{tuple(v_XGd.shape)} do not fit H={H}, G={G}")
    if tuple(cos_Td.shape) != (T, d) or tuple(sin_Td.shape) != (T, d) or slots_T.shape[0] != T:
        _fail(op, f"cos {tuple(cos_Td.shape)}, sin {tuple(sin_Td.shape)}, slots {tuple(slots_T.shape)}: need [{T}, {d}] and [{T}]")


def dispatch_rows(y_TD, key_R, k: int) -> None:
    op = "dispatch_rows"
    _dims(op, "y_TD", y_TD, 2)
    _dims(op, "key_R", key_R, 1)
    if k < 1 or key_R.shape[0] != y_TD.shape[0] * k:
        _fail(op, f"key_R has {key_R.shape[0]} rows, expected T*k = {y_TD.shape[0]}*{k}")


def unpermute_combine(out_sorted_RD, order_R, w_TK) -> None:
    op = "unpermute_combine"
    _dims(op, "out_sorted_RD", out_sorted_RD, 2)
    _dims(op, "order_R", order_R, 1)
    _dims(op, "w_TK", w_TK, 2)
    if out_sorted_RD.shape[0] != order_R.shape[0] or order_R.shape[0] != w_TK.numel():
        _fail(op, f"R mismatch: out {out_sorted_RD.shape[0]}, order {order_R.shape[0]}, T*K {w_TK.numel()}")


SCORINGS = ("softmax", "sigmoid")


def scoring(op: str, name: str) -> None:
    if name not in SCORINGS:
        _fail(op, f"scoring {name!r} is not supported (use one of {SCORINGS})")


def route(logits_TE, k, num_experts) -> None:
    topk_gating(logits_TE, k)
    if num_experts != logits_TE.shape[1]:
        _fail("route", f"num_experts={num_experts} but logits have {logits_TE.shape[1]} columns")


def permute_tokens(x_TD, order_R, k) -> None:
    op = "permute_tokens"
    _dims(op, "x_TD", x_TD, 2)
    _dims(op, "order_R", order_R, 1)
    if order_R.dtype not in (torch.int64, torch.int32):
        _fail(op, f"order_R must be int64/int32, got {order_R.dtype}")
    if k < 1 or order_R.shape[0] != x_TD.shape[0] * k:
        _fail(op, f"order_R has {order_R.shape[0]} rows, expected T*k = {x_TD.shape[0]}*{k}")


def paged_decode_attention(q_BHd, k_NSGd, v_NSGd, block_tables, seq_lens) -> None:
    """block_tables / seq_lens: host lists (values checked) or tensors (shapes checked only, so a
    CUDA call does not synchronise)."""
    op = "paged_decode_attention"
    _dims(op, "q_BHd", q_BHd, 3)
    _dims(op, "k_NSGd", k_NSGd, 4)
    _dims(op, "v_NSGd", v_NSGd, 4)
    for n, t in (("q_BHd", q_BHd), ("k_NSGd", k_NSGd), ("v_NSGd", v_NSGd)):
        _float(op, n, t)
    B, H, d = q_BHd.shape
    N, S, G, dk = k_NSGd.shape
    if tuple(v_NSGd.shape) != tuple(k_NSGd.shape):
        _fail(op, f"k cache {tuple(k_NSGd.shape)} and v cache {tuple(v_NSGd.shape)} differ")
    if k_NSGd.dtype != v_NSGd.dtype:
        _fail(op, f"k/v cache dtypes differ: {k_NSGd.dtype} vs {v_NSGd.dtype}")
    if dk != d:
        _fail(op, f"head dim: q has {d}, cache has {dk}")
    if G == 0 or H % G:
        _fail(op, f"{H} query heads are not a multiple of {G} kv heads")
    if q_BHd.device != k_NSGd.device or k_NSGd.device != v_NSGd.device:
        _fail(op, f"q on {q_BHd.device}, caches on {k_NSGd.device}/{v_NSGd.device}")
    if isinstance(block_tables, torch.Tensor):
        _dims(op, "block_tables", block_tables, 2)
        if block_tables.dtype not in (torch.int32, torch.int64) or block_tables.shape[0] != B:
            _fail(op, f"block_tables must be int32/int64 [B={B}, M], got {block_tables.dtype} {tuple(block_tables.shape)}")
        max_len = block_tables.shape[1] * S
    else:
        if len(block_tables) != B:
            _fail(op, f"{len(block_tables)} block tables for {B} sequences")
        for tbl in block_tables:
            if any(not 0 <= int(x) < N for x in tbl):
                _fail(op, f"block ids must be in [0, {N}), got {list(tbl)}")
        max_len = None
    if isinstance(seq_lens, torch.Tensor):
        _dims(op, "seq_lens", seq_lens, 1)
        if seq_lens.dtype not in (torch.int32, torch.int64) or seq_lens.shape[0] != B:
            _fail(op, f"seq_lens must be int32/int64 [B={B}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    else:
        if len(seq_lens) != B:
            _fail(op, f"{len(seq_lens)} seq_lens for {B} sequences")
        for b, L in enumerate(seq_lens):
            cap = max_len if max_len is not None else len(block_tables[b]) * S
            if not 1 <= int(L) <= cap:
                _fail(op, f"seq_lens[{b}]={int(L)} must be in [1, {cap}] ({cap // S} blocks of {S})")


def paged_attention(q_SnHd, k_NSGd, v_NSGd, tables_SM, qpos_Sn) -> None:
    """Shapes and dtypes only: the index tensors' values are the caller's (checking them would
    cost a host sync per call)."""
    op = "paged_attention"
    _dims(op, "q_SnHd", q_SnHd, 4)
    _dims(op, "k_NSGd", k_NSGd, 4)
    _dims(op, "tables_SM", tables_SM, 2)
    _dims(op, "qpos_Sn", qpos_Sn, 2)
    for n, t in (("q_SnHd", q_SnHd), ("k_NSGd", k_NSGd), ("v_NSGd", v_NSGd)):
        _float(op, n, t)
    S, n, H, d = q_SnHd.shape
    G, dk = k_NSGd.shape[2], k_NSGd.shape[3]
    if tuple(v_NSGd.shape) != tuple(k_NSGd.shape) or k_NSGd.dtype != v_NSGd.dtype:
        _fail(op, f"k cache {tuple(k_NSGd.shape)} {k_NSGd.dtype} and v cache {tuple(v_NSGd.shape)} {v_NSGd.dtype} differ")
    if dk != d or G == 0 or H % G:
        _fail(op, f"q heads {H}x{d} do not fit kv heads {G}x{dk}")
    if tables_SM.shape[0] != S or tuple(qpos_Sn.shape) != (S, n):
        _fail(op, f"tables {tuple(tables_SM.shape)} / qpos {tuple(qpos_Sn.shape)} do not match q [S={S}, n={n}]")
    if tables_SM.dtype != torch.int64 or qpos_Sn.dtype != torch.int64:
        _fail(op, f"tables and qpos must be int64, got {tables_SM.dtype}, {qpos_Sn.dtype}")
