"""Triton paged decode attention (one query token per sequence) over the data plane's KV blocks.

KV layout (amoe_serve.kv.cache, one layer): k/v [N blocks, S rows, G kv heads, d]; position p of
sequence b lives in block block_tables[b, p // S], row p % S. seq_lens vary per sequence.
One program handles one (sequence, kv head, KV split) and all H/G query heads sharing that kv
head (GQA/MQA: each K/V tile is loaded once for the whole head group). Long contexts with few
sequences are split along the KV axis (flash-decoding); a second kernel merges the partial
softmax states. Scores, softmax and accumulation in fp32.
Legend: B=sequences, H=heads, G=kv heads, d=head dim, N=blocks, S=block size, M=blocks per table.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, o_ptr, ml_ptr,
    scale, REP, HEAD_DIM, S, NUM_SPLITS,
    sq_b, sq_h, sk_n, sk_s, sk_g, sv_n, sv_s, sv_g, sbt_b, so_b, so_h, so_s,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    sp = tl.program_id(2)
    L = tl.load(lens_ptr + b).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(L, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = sp * per_split
    hi = tl.minimum(L, lo + per_split)

    hs = tl.arange(0, BLOCK_H)
    hmask = hs < REP
    heads = (g * REP + hs).to(tl.int64)
    ds = tl.arange(0, BLOCK_D)
    dmask = ds < HEAD_DIM
    qm = hmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + ds[None, :], mask=qm, other=0.0)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pmask = pos < hi
        blk = tl.load(bt_ptr + b * sbt_b + pos // S, mask=pmask, other=0).to(tl.int64)
        row = (pos % S).to(tl.int64)
        kvm = pmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + (blk * sk_n + row * sk_s + g * sk_g)[:, None] + ds[None, :], mask=kvm, other=0.0)
        v = tl.load(v_ptr + (blk * sv_n + row * sv_s + g * sv_g)[:, None] + ds[None, :], mask=kvm, other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC) * scale
        s = tl.where(pmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
        m_i = m_new

    if SPLIT:
        # partial state: acc (unnormalised) [B, H, splits, d] in o_ptr (fp32); m, l in ml_ptr
        base = b * so_b + heads * so_h + sp * so_s
        tl.store(o_ptr + base[:, None] + ds[None, :], acc, mask=qm)
        ml = ml_ptr + (b * tl.num_programs(1) * REP + heads) * NUM_SPLITS * 2 + sp * 2
        tl.store(ml, m_i, mask=hmask)
        tl.store(ml + 1, l_i, mask=hmask)
    else:
        out = acc / l_i[:, None]
        tl.store(o_ptr + b * so_b + heads[:, None] * so_h + ds[None, :], out.to(o_ptr.dtype.element_ty), mask=qm)


@triton.jit
def _merge_splits_kernel(part_ptr, ml_ptr, o_ptr, H, HEAD_DIM, NUM_SPLITS,
                         sp_b, sp_h, sp_s, so_b, so_h,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    ss = tl.arange(0, BLOCK_S)
    smask = ss < NUM_SPLITS
    ds = tl.arange(0, BLOCK_D)
    dmask = ds < HEAD_DIM
    ml = ml_ptr + (b * H + h) * NUM_SPLITS * 2 + ss * 2
    m_s = tl.load(ml, mask=smask, other=float("-inf"))
    l_s = tl.load(ml + 1, mask=smask, other=0.0)
    m = tl.max(m_s, axis=0)
    scale_s = tl.where(m_s > float("-inf"), tl.exp(m_s - m), 0.0)
    acc = tl.load(part_ptr + b * sp_b + h * sp_h + ss[:, None] * sp_s + ds[None, :],
                  mask=smask[:, None] & dmask[None, :], other=0.0)
    num = tl.sum(acc * scale_s[:, None], axis=0)
    den = tl.sum(l_s * scale_s, axis=0)
    tl.store(o_ptr + b * so_b + h * so_h + ds, (num / den).to(o_ptr.dtype.element_ty), mask=dmask)


def num_splits(B: int, G: int, max_len: int, cfg: dict) -> int:
    want = -(-cfg["target_programs"] // max(1, B * G))
    by_len = -(-max_len // cfg["min_tokens_per_split"])
    return max(1, min(want, by_len, cfg["max_splits"]))


def paged_decode_attention(q_BHd, k_NSGd, v_NSGd, block_tables_BM, seq_lens_B, scale, max_seq_len=None, cfg=None):
    """q [B, H, d]; block_tables_BM int32/int64 [B, M] on q's device; seq_lens_B [B].
    Returns [B, H*d] in q's dtype."""
    B, H, d = q_BHd.shape
    N, S, G, _ = k_NSGd.shape
    out = torch.empty(B, H, d, dtype=q_BHd.dtype, device=q_BHd.device)
    if B == 0:
        return out.view(B, H * d)
    q_BHd, k_NSGd, v_NSGd = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_BHd, k_NSGd, v_NSGd))
    cfg = cfg or tuning.config("paged_decode_attention", q_BHd.device)
    if max_seq_len is None:
        max_seq_len = int(seq_lens_B.max())
    rep = H // G
    BH = max(16, triton.next_power_of_2(rep))
    BD = max(16, triton.next_power_of_2(d))
    BN = cfg["BLOCK_N"]
    splits = num_splits(B, G, max_seq_len, cfg)
    prec = "ieee" if q_BHd.dtype == torch.float32 else "tf32"
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    common = (scale, rep, d, S, splits,
              q_BHd.stride(0), q_BHd.stride(1), k_NSGd.stride(0), k_NSGd.stride(1), k_NSGd.stride(2),
              v_NSGd.stride(0), v_NSGd.stride(1), v_NSGd.stride(2), block_tables_BM.stride(0))
    if splits == 1:
        _paged_decode_kernel[(B, G, 1)](
            q_BHd, k_NSGd, v_NSGd, block_tables_BM, seq_lens_B, out, out, *common,
            out.stride(0), out.stride(1), 0,
            BLOCK_H=BH, BLOCK_D=BD, BLOCK_N=BN, SPLIT=False, DOT_PREC=prec, **launch,
        )
    else:
        part = torch.empty(B, H, splits, d, dtype=torch.float32, device=q_BHd.device)
        ml = torch.empty(B, H, splits, 2, dtype=torch.float32, device=q_BHd.device)
        _paged_decode_kernel[(B, G, splits)](
            q_BHd, k_NSGd, v_NSGd, block_tables_BM, seq_lens_B, part, ml, *common,
            part.stride(0), part.stride(1), part.stride(2),
            BLOCK_H=BH, BLOCK_D=BD, BLOCK_N=BN, SPLIT=True, DOT_PREC=prec, **launch,
        )
        _merge_splits_kernel[(B, H)](
            part, ml, out, H, d, splits, part.stride(0), part.stride(1), part.stride(2),
            out.stride(0), out.stride(1), BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=BD, num_warps=1,
        )
    return out.view(B, H * d)
