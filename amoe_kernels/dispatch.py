"""Operator entry points: validate shapes, then pick a backend.

Rule: Triton when the tensors are on CUDA and triton imports; the PyTorch reference otherwise
(CPU tensors always get the reference numbers; grouped_expert_ffn computes them with
torch._grouped_mm, bit-identical to the per-expert loop, unless the reference is named).
Decode attention, and the grouped expert FFN of small fp32 experts and of bf16 experts under
fp32 compute, on CPU run the C kernels of native.py when they build (the same result up to the
order of fp32 sums), unless the reference is named; without them bf16 experts are widened by
upcast.py.
`backend="triton"` forces the kernels (tests run them on CPU tensors under TRITON_INTERPRET=1),
`backend="reference"` forces the reference. The environment variable AMOE_KERNELS_BACKEND
(auto | reference | triton) sets the default for calls that pass no backend.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

import torch.nn.functional as Fn

from . import checks, grouped_mm, native, reference, upcast

BACKENDS = ("auto", "reference", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"amoe_kernels.{name}")


def backend_for(t: torch.Tensor, backend: str | None = None) -> str:
    """'triton' or 'reference' for an op whose main tensor is t."""
    choice = backend or os.environ.get("AMOE_KERNELS_BACKEND", "auto") or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"backend {choice!r} is not one of {BACKENDS}")
    if choice == "reference":
        return "reference"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was requested but triton does not import")
        if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)")
        if t.device.type != "cuda" and t.dtype == torch.bfloat16:
            raise RuntimeError("the Triton interpreter does not support bfloat16; use fp32/fp16 on CPU")
        return "triton"
    return "triton" if t.is_cuda and triton_available() else "reference"


def _named_reference(backend: str | None) -> bool:
    return (backend or os.environ.get("AMOE_KERNELS_BACKEND", "auto") or "auto") == "reference"


def _widening(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.dtype != w.dtype  # checks allow only fp32 over bf16/fp16 weights


def linear(x_TD, w_OD, b_O=None, backend: str | None = None):
    """x @ w.T + b. fp32 on CPU (D a multiple of 8): the C kernel (csrc/linear.c; no packing
    copy of w per call, and a token's bits independent of its batch), chosen by dtype and shape
    alone; the fused block step uses the same function. Weights narrower than x (bf16 at rest,
    fp32 compute) are widened per call, a slice at a time (upcast.py); the reference (by name)
    is F.linear, widening the whole weight."""
    checks.linear(x_TD, w_OD, b_O)
    if not _widening(x_TD, w_OD):
        if x_TD.dim() == 2 and _native_linear(x_TD, w_OD) and not _named_reference(backend):
            y_TO = native.linear(x_TD.contiguous(), w_OD)  # a strided view gets the same bits too
            return y_TO if b_O is None else y_TO.add_(b_O)
        return Fn.linear(x_TD, w_OD, b_O)
    if _named_reference(None):
        return Fn.linear(x_TD, w_OD.to(x_TD.dtype), None if b_O is None else b_O.to(x_TD.dtype))
    return upcast.linear(x_TD, w_OD, b_O)


def set_linear_threads(n: int) -> None:
    """Threads of this process's large fp32 CPU linear and decode-attention calls (C kernels; 1 by
    default). The split is by whole outputs and whole sequences: the bits do not depend on it."""
    native.set_linear_threads(n)


def _native_linear(x_TD, w_OD) -> bool:
    return x_TD.dtype == torch.float32 and x_TD.is_cpu and x_TD.shape[1] % 8 == 0 and native.supports(w_OD)


def expert_ffn(x_TD, w1_FD, w3_FD, w2_DF, backend: str | None = None):
    checks.expert_ffn(x_TD, w1_FD, w3_FD, w2_DF)
    widening = _widening(x_TD, w1_FD)
    if widening and _named_reference(backend):
        return reference.expert_ffn(x_TD, *(w.to(x_TD.dtype) for w in (w1_FD, w3_FD, w2_DF)))
    if not widening and backend_for(x_TD, backend) == "triton":
        return _module("triton_moe").grouped_expert_ffn(x_TD, [x_TD.shape[0]], w1_FD[None], w3_FD[None], w2_DF[None])
    # The grouped path's kernel, so one expert's rows get the same bits either way.
    y_TD = None if _named_reference(backend) else _native_grouped(x_TD, [x_TD.shape[0]], w1_FD[None], w3_FD[None],
                                                                  w2_DF[None], [0])
    if y_TD is not None:
        return y_TD
    if widening:
        return upcast.expert_ffn(x_TD, w1_FD, w3_FD, w2_DF)
    return reference.expert_ffn(x_TD, w1_FD, w3_FD, w2_DF)


def grouped_expert_ffn(x_TD, counts_G, w1_GFD, w3_GFD, w2_GDF, experts=None, backend: str | None = None):
    """Rows of x sorted by expert (counts_G[g] rows for expert g, in order); one launch per GEMM.
    experts (optional): group g uses stacked weight row experts[g] (no copy of the stacks)."""
    counts_G = [int(c) for c in counts_G]
    experts = None if experts is None else [int(e) for e in experts]
    checks.grouped_expert_ffn(x_TD, counts_G, w1_GFD, w3_GFD, w2_GDF, experts)
    named_reference = _named_reference(backend)
    if _widening(x_TD, w1_GFD):
        if named_reference:  # the definition: fp32 on the whole widened stacks
            ws = (w.to(x_TD.dtype) for w in (w1_GFD, w3_GFD, w2_GDF))
            return reference.grouped_expert_ffn(x_TD, counts_G, *ws, experts)
        y_TD = _native_grouped(x_TD, counts_G, w1_GFD, w3_GFD, w2_GDF, experts)
        if y_TD is not None:
            return y_TD
        return upcast.grouped_expert_ffn(x_TD, counts_G, w1_GFD, w3_GFD, w2_GDF, experts)
    chosen = backend_for(x_TD, backend)
    if chosen == "triton":
        return _module("triton_moe").grouped_expert_ffn(x_TD, counts_G, w1_GFD, w3_GFD, w2_GDF, experts=experts)
    y_TD = None if named_reference else _native_grouped(x_TD, counts_G, w1_GFD, w3_GFD, w2_GDF, experts)
    if y_TD is not None:
        return y_TD
    # Unless the reference is asked for by name: the same numbers in one GEMM per weight.
    if not named_reference and x_TD.shape[0] \
            and not x_TD.is_cuda and grouped_mm.supports(x_TD.shape[1], w1_GFD.shape[1], x_TD.dtype):
        offs_G = grouped_mm.offsets(counts_G, experts, w1_GFD.shape[0])
        if offs_G is not None:
            return grouped_mm.grouped_expert_ffn(x_TD, offs_G.to(x_TD.device), w1_GFD, w3_GFD, w2_GDF)
    return reference.grouped_expert_ffn(x_TD, counts_G, w1_GFD, w3_GFD, w2_GDF, experts)


def _native_experts(x_TD, w1_GFD, w3_GFD, w2_GDF) -> bool:
    """Whether the C kernel takes these experts: fp32 rows on CPU with AVX2, D and F multiples of
    8, weights fp32 or bf16 (same dtype for all three, which checks.grouped_expert_ffn has made
    sure of). Chosen by shape and dtype alone, never by the step's rows, so a token's bits are the
    same however the scheduler grouped it. It beats MKL (torch._grouped_mm) at every size and row
    count measured here except one row of a 4096 x 14336 expert (0.87x): 1.5-2x at 4-16 rows per
    expert, 1.1-1.6x at 64, 1.0-1.1x at 256 (fp32, weights cold, one core; docs/bench/overhead/
    README.md, ninth round). bf16 at rest is read and widened in registers: 3.7-4.6x upcast.py's
    widen-then-GEMM at 1-4 rows per expert."""
    D, F = x_TD.shape[1], w1_GFD.shape[1]
    if D % 8 or F % 8 or not native.supports(x_TD):
        return False
    return native.supports(w1_GFD, w3_GFD, w2_GDF, any_dtype=w1_GFD.dtype == torch.bfloat16)


def _native_grouped(x_TD, counts_G, w1_GFD, w3_GFD, w2_GDF, experts):
    """The C kernel's output where _native_experts takes these tensors and it has an AVX2 path;
    None otherwise (the caller's torch path runs)."""
    if not x_TD.shape[0] or not _native_experts(x_TD, w1_GFD, w3_GFD, w2_GDF):
        return None
    return native.grouped_swiglu(x_TD, counts_G, w1_GFD, w3_GFD, w2_GDF,
                                 list(range(len(counts_G))) if experts is None else experts)


def topk_gating(logits_TE, k: int, renormalize: bool, scoring: str = "softmax", weight_dtype=None,
                backend: str | None = None):
    """(w_TK, ids_TK): scores = softmax or sigmoid of the logits in fp32, top-k in descending
    order, optional renormalisation over the k weights, weights cast to weight_dtype (fp32 if None)."""
    checks.scoring("topk_gating", scoring)
    checks.topk_gating(logits_TE, k)
    if backend_for(logits_TE, backend) == "triton":
        return _module("triton_moe").topk_gating(logits_TE, k, renormalize, weight_dtype, scoring)
    if scoring == "softmax" and weight_dtype in (None, torch.float32) and not _named_reference(backend) \
            and native.supports(logits_TE):
        w_TK, ids_TK = native.topk_gating(logits_TE, k, renormalize)
        return w_TK, ids_TK
    return reference.topk_gating(logits_TE, k, renormalize, weight_dtype, scoring)


def _fused_ok(backend, floats, ints, route, T: int, top_k: int) -> bool:
    """Whether the fused block-step kernels take these tensors: fp32 / int64 contiguous CPU
    tensors, D a multiple of 8, the library built, and the reference not named."""
    if _named_reference(backend) or not native.available() or floats[0].dtype != torch.float32:
        return False
    if floats[0].shape[1] % 8:  # D: the projections' linear.c needs a multiple of 8
        return False
    if not native.supports(*floats) or not native.supports(*ints, any_dtype=True) \
            or any(t.dtype != torch.int64 for t in ints):
        return False
    return route is None or (native.supports(*route, any_dtype=True) and route[0].dtype == torch.int64
                             and route[1].dtype == torch.float32 and route[0].shape == route[1].shape == (T, top_k))


def _pre_shapes_ok(x_TD, ln1_D, w_qkv_QD, H, G, d, cos_Td, sin_Td, slots_T, k_XGd, v_XGd) -> bool:
    """The shapes the C first part reads and writes (it trusts them; the slots it checks)."""
    T, D = x_TD.shape
    return (ln1_D.shape == (D,) and w_qkv_QD.shape == ((H + 2 * G) * d, D) and cos_Td.shape == sin_Td.shape == (T, d)
            and slots_T.shape == (T,) and k_XGd.dim() == 3 and k_XGd.shape[1:] == (G, d)
            and v_XGd.shape == k_XGd.shape)


def _post_shapes_ok(x_TD, Hd: int, w_o_DX, ln2_D, w_gate_ED, key_E) -> bool:
    """The shapes the C last part reads (it trusts them; expert ids and keys it checks)."""
    D = x_TD.shape[1]
    return (w_o_DX.shape == (D, Hd) and ln2_D.shape == (D,) and w_gate_ED.dim() == 2 and w_gate_ED.shape[1] == D
            and key_E.shape == (w_gate_ED.shape[0],))


def attn_decode_block(x_TD, ln1_D, w_qkv_QD, w_o_DX, ln2_D, w_gate_ED, eps: float, H: int, G: int, d: int,
                      cos_Td, sin_Td, slots_T, k_XGd, v_XGd, tables_TM, lens_T, block_size: int, scale: float,
                      top_k: int, renormalize: bool, key_E, num_keys: int, seg: int, route=None,
                      backend: str | None = None):
    """One block of the attention side for an all-decode batch (one query per sequence), fused:
    rms_norm, the qkv projection, rope_kv_write, the paged decode attention, the o projection
    and residual, rms_norm, the router and topk_gating (unless route = (ids_TK, w_TK) is given)
    and dispatch_rows keyed by key_E[expert]. Returns (h_TD, y_TD, w_TK, ids_TK, meta_R3, y_RD,
    counts_X), the bits of those ops called one by one on fp32 CPU; None where the fused C step
    does not apply (other dtypes or devices, D or H*d not a multiple of 8, the reference named, no
    C compiler): the caller runs the ops one by one then."""
    T, D = x_TD.shape
    floats = (x_TD, ln1_D, w_qkv_QD, w_o_DX, ln2_D, w_gate_ED, cos_Td, sin_Td, k_XGd, v_XGd)
    if not _fused_ok(backend, floats, (slots_T, tables_TM, lens_T, key_E), route, T, top_k):
        return None
    if not _pre_shapes_ok(x_TD, ln1_D, w_qkv_QD, H, G, d, cos_Td, sin_Td, slots_T, k_XGd, v_XGd) \
            or (H * d) % 8 or not _post_shapes_ok(x_TD, H * d, w_o_DX, ln2_D, w_gate_ED, key_E) \
            or lens_T.shape != (T,) or tables_TM.dim() != 2 or tables_TM.shape[0] != T or k_XGd.shape[0] % block_size:
        return None
    return native.attn_decode_block(x_TD, ln1_D, w_qkv_QD, w_o_DX, ln2_D, w_gate_ED, eps, H, G, d, cos_Td, sin_Td,
                                    slots_T, k_XGd, v_XGd, tables_TM, lens_T, block_size, scale, top_k, renormalize,
                                    key_E, num_keys, seg, route)


def attn_pre(x_TD, ln1_D, w_qkv_QD, eps: float, H: int, G: int, d: int, cos_Td, sin_Td, slots_T, k_XGd, v_XGd,
             backend: str | None = None):
    """attn_decode_block's first part for any rows (prefill spans too): rms_norm, the qkv
    projection and rope_kv_write; returns q [T, H, d] (the new K/V written), or None where the
    fused kernels do not apply."""
    T, D = x_TD.shape
    if not _fused_ok(backend, (x_TD, ln1_D, w_qkv_QD, cos_Td, sin_Td, k_XGd, v_XGd), (slots_T,), None, T, 1):
        return None
    if not _pre_shapes_ok(x_TD, ln1_D, w_qkv_QD, H, G, d, cos_Td, sin_Td, slots_T, k_XGd, v_XGd):
        return None
    return native.attn_pre(x_TD, ln1_D, w_qkv_QD, eps, H, G, d, cos_Td, sin_Td, slots_T, k_XGd, v_XGd)


def attn_post(x_TD, o_TX, w_o_DX, ln2_D, w_gate_ED, eps: float, top_k: int, renormalize: bool, key_E,
              num_keys: int, seg: int, route=None, backend: str | None = None):
    """attn_decode_block's last part for any rows, after the attention (o_TX): the o projection
    and residual, rms_norm, the router and topk_gating (or route) and dispatch_rows; the same
    tuple, or None where the fused kernels do not apply."""
    T, D = x_TD.shape
    if not _fused_ok(backend, (x_TD, o_TX, w_o_DX, ln2_D, w_gate_ED), (key_E,), route, T, top_k):
        return None
    if o_TX.dim() != 2 or o_TX.shape[0] != T or o_TX.shape[1] % 8 \
            or not _post_shapes_ok(x_TD, o_TX.shape[1], w_o_DX, ln2_D, w_gate_ED, key_E):
        return None
    return native.attn_post(x_TD, o_TX, w_o_DX, ln2_D, w_gate_ED, eps, top_k, renormalize, key_E, num_keys, seg,
                            route)


def route(logits_TE, k: int, renormalize: bool, num_experts: int | None = None, scoring: str = "softmax",
          weight_dtype=None, backend: str | None = None):
    """topk_gating plus dispatch metadata in one call (one kernel on Triton):
    (w_TK, ids_TK, order_R, counts_E), order_R/counts_E as returned by permute(ids_TK)."""
    num_experts = logits_TE.shape[1] if num_experts is None else num_experts
    checks.scoring("route", scoring)
    checks.route(logits_TE, k, num_experts)
    if backend_for(logits_TE, backend) == "triton":
        return _module("triton_moe").route(logits_TE, k, renormalize, num_experts, weight_dtype, scoring)
    if _named_reference(backend):
        return reference.route(logits_TE, k, renormalize, num_experts, weight_dtype, scoring)
    w_TK, ids_TK = topk_gating(logits_TE, k, renormalize, scoring, weight_dtype, backend)  # the same gating bits
    return (w_TK, ids_TK, *reference.permute(ids_TK, num_experts))


def permute(ids_TK, num_experts: int | None = None, backend: str | None = None):
    """(order_R, counts_E): stable sort of the flat (token, slot) rows by expert.
    num_experts=None infers max id + 1 (pass it explicitly to get a fixed-length counts_E)."""
    if num_experts is None:
        num_experts = int(ids_TK.max()) + 1 if ids_TK.numel() else 0
    checks.permute(ids_TK, num_experts)
    if backend_for(ids_TK, backend) == "triton":
        return _module("triton_moe").permute(ids_TK, num_experts)
    return reference.permute(ids_TK, num_experts)


def permute_tokens(x_TD, order_R, k: int, backend: str | None = None):
    """Gather token rows into expert order: x_TD[order_R // k] ([T*k, D])."""
    checks.permute_tokens(x_TD, order_R, k)
    if backend_for(x_TD, backend) == "triton":
        return _module("triton_moe").permute_tokens(x_TD, order_R, k)
    return reference.permute_tokens(x_TD, order_R, k)


def rms_norm(x_TD, w_D, eps: float, backend: str | None = None):
    """HF RMSNorm (reference.rms_norm); one native call for fp32 CPU rows (the same up to the
    order of the mean's sum)."""
    checks.rms_norm(x_TD, w_D)
    if not _named_reference(backend) and x_TD.dim() == 2 and native.supports(x_TD, w_D):
        return native.rms_norm(x_TD, w_D, eps)
    return reference.rms_norm(x_TD, w_D, eps)


def moe_combine(h_TD, out_TKD, w_TK, s_TD=None, backend: str | None = None):
    """h + the top-k merge (combine_slots) + the shared expert's output where the model has one.
    fp32 CPU without a shared expert: one native call, bit-identical to the reference."""
    checks.moe_combine(h_TD, out_TKD, w_TK)
    if s_TD is None and not _named_reference(backend) and native.supports(h_TD, out_TKD, w_TK):
        return native.moe_combine(h_TD, out_TKD, w_TK)
    return reference.moe_combine(h_TD, out_TKD, w_TK, s_TD)


def rope_kv_write(qkv_TX, cos_Td, sin_Td, H: int, G: int, slots_T, k_XGd, v_XGd, backend: str | None = None):
    """RoPE on a fused [q | k | v] projection, k and v into their cache slots; returns q [T, H, d].
    One native pass on fp32 CPU with an fp32 cache (the reference's bits)."""
    checks.rope_kv_write(qkv_TX, cos_Td, sin_Td, H, G, slots_T, k_XGd, v_XGd)
    if not _named_reference(backend) and qkv_TX.stride(1) == 1 \
            and native.supports(cos_Td, sin_Td, k_XGd, v_XGd) and qkv_TX.dtype == torch.float32:
        return native.rope_kv_write(qkv_TX, cos_Td, sin_Td, H, G, slots_T, k_XGd, v_XGd)
    return reference.rope_kv_write(qkv_TX, cos_Td, sin_Td, H, G, slots_T, k_XGd, v_XGd)


def dispatch_rows(y_TD, key_R, k: int, seg: int, num_keys: int, backend: str | None = None):
    """The attention rank's dispatch rows: (token, slot) rows stably sorted by key (owner rank *
    E + expert) as (meta_R3 = (seg, token, slot) int32, y_RD, counts per key); one native pass
    on CPU (the same bytes as the reference)."""
    checks.dispatch_rows(y_TD, key_R, k)
    if not _named_reference(backend) and native.supports(y_TD, key_R, any_dtype=True):
        return native.dispatch_rows(y_TD, key_R, k, seg, num_keys)
    return reference.dispatch_rows(y_TD, key_R, k, seg, num_keys)


def pool_scatter(tok_R, slot_R, done_X, out_RD, dst_TKD, backend: str | None = None) -> int:
    """Rows of an expert reply into the token pool: dst_TKD[tok_R[r], slot_R[r]] = out_RD[r],
    marking done_X (numpy bool, T*K) at tok*K + slot. Validated before anything is written:
    ValueError for an index out of range or a (token, slot) already delivered or repeated (the
    marks unchanged then). Returns the rows written. One native pass for CPU rows of the pool's
    dtype with int32 index columns of one stride (an expert reply's meta); the reference else."""
    code = None
    if not _named_reference(backend) and tok_R.dtype == slot_R.dtype == torch.int32 and tok_R.is_cpu \
            and slot_R.is_cpu and tok_R.dim() == 1 and slot_R.shape == tok_R.shape \
            and tok_R.stride(0) == slot_R.stride(0) and out_RD.dtype == dst_TKD.dtype \
            and out_RD.shape == (tok_R.shape[0], dst_TKD.shape[2]) and done_X.dtype == bool \
            and done_X.flags.c_contiguous and done_X.size == dst_TKD.shape[0] * dst_TKD.shape[1] \
            and native.supports(out_RD, dst_TKD, any_dtype=True):
        code = native.pool_scatter(tok_R, slot_R, done_X, out_RD, dst_TKD)
    if code is None:
        return reference.pool_scatter(tok_R, slot_R, done_X, out_RD, dst_TKD)
    if code == -1:
        raise ValueError(f"(token, slot) index out of range for T={dst_TKD.shape[0]}, K={dst_TKD.shape[1]}")
    if code == -2:
        raise ValueError("a (token, slot) pair was already delivered or appears twice in one delivery")
    return int(code)


def combine_slots(out_TKD, w_TK, backend: str | None = None):
    checks.combine_slots(out_TKD, w_TK)
    if backend_for(out_TKD, backend) == "triton":
        return _module("triton_moe").combine_slots(out_TKD, w_TK)
    return reference.combine_slots(out_TKD, w_TK)


def unpermute_combine(out_sorted_RD, order_R, w_TK, backend: str | None = None):
    checks.unpermute_combine(out_sorted_RD, order_R, w_TK)
    if backend_for(out_sorted_RD, backend) == "triton":
        return _module("triton_moe").unpermute_combine(out_sorted_RD, order_R, w_TK)
    return reference.unpermute_combine(out_sorted_RD, order_R, w_TK)


def _padded_tables(block_tables, device) -> torch.Tensor:
    if isinstance(block_tables, torch.Tensor):
        return block_tables.to(device)
    M = max((len(t) for t in block_tables), default=0)
    bt = torch.zeros(len(block_tables), max(M, 1), dtype=torch.int32)
    for i, t in enumerate(block_tables):
        if len(t):
            bt[i, : len(t)] = torch.as_tensor(list(t), dtype=torch.int32)
    return bt.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else bt


def paged_decode_attention(q_BHd, k_NSGd, v_NSGd, block_tables, seq_lens, scale: float,
                           backend: str | None = None):
    """Decode attention: one query per sequence at position seq_lens[b]-1 (its K/V already in the
    cache) over positions 0..seq_lens[b]-1, read through block_tables ([B, M] tensor or lists of
    block ids). GQA/MQA via H = G * rep. Returns [B, H*d] in q's dtype."""
    checks.paged_decode_attention(q_BHd, k_NSGd, v_NSGd, block_tables, seq_lens)
    if backend_for(q_BHd, backend) == "triton":
        dev = q_BHd.device
        max_len = None
        if isinstance(seq_lens, torch.Tensor):
            lens = seq_lens.to(dev)
        else:
            max_len = max((int(x) for x in seq_lens), default=0)
            lens = torch.tensor([int(x) for x in seq_lens], dtype=torch.int32)
            lens = lens.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else lens
        mod = _module("triton_attention")
        return mod.paged_decode_attention(q_BHd, k_NSGd, v_NSGd, _padded_tables(block_tables, dev), lens, scale, max_len)
    if not _named_reference(backend) and native.supports(k_NSGd, v_NSGd) and q_BHd.dtype == k_NSGd.dtype:
        return native.paged_decode_attention(q_BHd, k_NSGd, v_NSGd, _padded_tables(block_tables, q_BHd.device),
                                             torch.as_tensor(seq_lens), scale)
    if isinstance(block_tables, torch.Tensor):
        block_tables = block_tables.tolist()
    if isinstance(seq_lens, torch.Tensor):
        seq_lens = seq_lens.tolist()
    return reference.paged_decode_attention(q_BHd, k_NSGd, v_NSGd, block_tables, seq_lens, scale)


def paged_attention(q_SnHd, k_NSGd, v_NSGd, tables_SM, qpos_Sn, scale: float, backend: str | None = None,
                    future_SnL=None):
    """Batched causal attention over a paged KV cache, prefill and decode alike (see
    reference.paged_attention): a gather and two batched GEMMs. On fp32 CPU tensors every query
    row, decode or prompt, goes to the native decode kernel over its own prefix (positions
    0..qpos), which reads the blocks in place: a prompt token gets the bits it would get decoded
    alone. All-decode batches on CUDA go through paged_decode_attention's Triton kernel instead."""
    checks.paged_attention(q_SnHd, k_NSGd, v_NSGd, tables_SM, qpos_Sn)
    if not _named_reference(backend) and native.supports(k_NSGd, v_NSGd) and q_SnHd.dtype == k_NSGd.dtype:
        S, n, H, d = q_SnHd.shape
        if n == 1:
            return native.paged_decode_attention(q_SnHd[:, 0], k_NSGd, v_NSGd, tables_SM, qpos_Sn[:, 0] + 1,
                                                 scale)[:, None]
        M = tables_SM.shape[1]
        # Padding rows repeat a real row's position (kv.batch), so each length is within its table.
        tables_RM = tables_SM[:, None, :].expand(S, n, M).reshape(S * n, M)
        out_RX = native.paged_decode_attention(q_SnHd.reshape(S * n, H, d), k_NSGd, v_NSGd, tables_RM,
                                               qpos_Sn.reshape(-1) + 1, scale)
        return out_RX.view(S, n, H * d)
    return reference.paged_attention(q_SnHd, k_NSGd, v_NSGd, tables_SM, qpos_Sn, scale, future_SnL)
