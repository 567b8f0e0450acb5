"""Pure-PyTorch reference MoE operators (no shape checks: see `amoe_kernels.checks`).

Legend: T=tokens, D=hidden, F=expert ffn, E=experts, K=top-k slots, G=experts in a group,
R=T*K routed rows; attention: B=sequences, H=heads, G=kv heads, d=head dim, N=KV blocks,
S=block size, M=blocks per table, L=context length.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as Fn


def expert_ffn(x_TD: torch.Tensor, w1_FD: torch.Tensor, w3_FD: torch.Tensor, w2_DF: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert: w2(silu(x w1^T) * (x w3^T)), same op order as HF."""
    return Fn.linear(Fn.silu(Fn.linear(x_TD, w1_FD)) * Fn.linear(x_TD, w3_FD), w2_DF)


def grouped_expert_ffn(
    x_TD: torch.Tensor,
    counts_G: list[int],
    w1_GFD: torch.Tensor,
    w3_GFD: torch.Tensor,
    w2_GDF: torch.Tensor,
    experts: list[int] | None = None,
) -> torch.Tensor:
    """Rows are sorted by expert: the first counts[0] rows go to expert 0 of the group, etc.
    experts (optional): the i-th group of rows uses stacked weights row experts[i] (a subset of a
    larger stack, without copying it)."""
    y_TD = torch.empty_like(x_TD)
    start = 0
    for g, n in enumerate(counts_G):
        if n:
            e = g if experts is None else experts[g]
            y_TD[start : start + n] = expert_ffn(x_TD[start : start + n], w1_GFD[e], w3_GFD[e], w2_GDF[e])
        start += n
    return y_TD


def topk_gating(
    logits_TE: torch.Tensor,
    k: int,
    renormalize: bool,
    weight_dtype: torch.dtype | None = None,
    scoring: str = "softmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF routing: softmax (or sigmoid) in fp32, top-k, optional renormalization, then cast.

    weight_dtype=None keeps fp32 (Mixtral); Qwen2-MoE / OLMoE pass the logits dtype.
    """
    if scoring == "sigmoid":
        probs_TE = torch.sigmoid(logits_TE.float())
    else:
        probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    w_TK, ids_TK = torch.topk(probs_TE, k, dim=-1)
    if renormalize:
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
    if weight_dtype is not None:
        w_TK = w_TK.to(weight_dtype)
    return w_TK, ids_TK.to(torch.int64)


def permute(ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of the flattened (token, slot) rows by expert.

    order_R[i] = flat row index t*K + k of the i-th row in expert order; counts_E[e] = rows of expert e.
    """
    ids_R = ids_TK.reshape(-1)
    order_R = torch.sort(ids_R, stable=True).indices
    counts_E = torch.bincount(ids_R, minlength=num_experts)
    return order_R, counts_E


def rope_kv_write(qkv_TX: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor, H: int, G: int,
                  slots_T: torch.Tensor, k_XGd: torch.Tensor, v_XGd: torch.Tensor) -> torch.Tensor:
    """RoPE on q and k of a fused [q | k | v] projection (sin's first half negated, so rotate-half
    is a swap of halves), k and v written at their flat cache slots (cast to the cache's dtype);
    returns the rotated q [T, H, d]."""
    T, d = qkv_TX.shape[0], k_XGd.shape[2]
    half = d // 2
    x_TXd = qkv_TX[:, :(H + G) * d].view(T, H + G, d)
    qk_TXd = x_TXd * cos_Td[:, None] + torch.cat((x_TXd[..., half:], x_TXd[..., :half]), dim=-1) * sin_Td[:, None]
    k_XGd.index_copy_(0, slots_T, qk_TXd[:, H:].to(k_XGd.dtype))
    v_XGd.index_copy_(0, slots_T, qkv_TX[:, (H + G) * d:].reshape(T, G, d).to(v_XGd.dtype))
    return qk_TXd[:, :H]


def dispatch_rows(y_TD: torch.Tensor, key_R: torch.Tensor, k: int, seg: int, num_keys: int):
    """Rows r = t*k + slot stably sorted by key_R[r]: (meta_R3 int32 = (seg, t, slot) per row,
    y_RD = y_TD[t] per row, counts_X = rows per key)."""
    order_R = torch.argsort(key_R, stable=True)
    t_R = order_R // k
    meta_R3 = torch.stack([torch.full_like(t_R, seg), t_R, order_R % k], dim=1).to(torch.int32)
    return meta_R3, y_TD[t_R], torch.bincount(key_R, minlength=num_keys)


def route(
    logits_TE: torch.Tensor,
    k: int,
    renormalize: bool,
    num_experts: int,
    weight_dtype: torch.dtype | None = None,
    scoring: str = "softmax",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gating plus dispatch metadata: (w_TK, ids_TK, order_R, counts_E)."""
    w_TK, ids_TK = topk_gating(logits_TE, k, renormalize, weight_dtype, scoring)
    order_R, counts_E = permute(ids_TK, num_experts)
    return w_TK, ids_TK, order_R, counts_E


def pool_scatter(tok_R: torch.Tensor, slot_R: torch.Tensor, done_X: np.ndarray, out_RD: torch.Tensor,
                 dst_TKD: torch.Tensor) -> int:
    """dst_TKD[tok, slot] = out_RD rows, marking done_X[tok * K + slot]; ValueError (nothing
    written, marks unchanged) for an index out of range or a pair delivered before or twice."""
    T, K, D = dst_TKD.shape
    R = tok_R.numel()
    if R == 0:
        return 0
    t_R = tok_R.cpu().numpy().astype(np.int64)
    s_R = slot_R.cpu().numpy().astype(np.int64)
    if t_R.min() < 0 or s_R.min() < 0 or t_R.max() >= T or s_R.max() >= K:
        raise ValueError(f"(token, slot) index out of range for T={T}, K={K}")
    flat_R = t_R * K + s_R
    if done_X[flat_R].any() or np.unique(flat_R).size != R:
        raise ValueError("a (token, slot) pair was already delivered or appears twice in one delivery")
    done_X[flat_R] = True
    dst_TKD.view(T * K, D).index_copy_(0, torch.from_numpy(flat_R).to(dst_TKD.device),
                                       out_RD.to(dst_TKD.device, dst_TKD.dtype))
    return R


def permute_tokens(x_TD: torch.Tensor, order_R: torch.Tensor, k: int) -> torch.Tensor:
    """Gather token rows into expert order: row i of the result is token order_R[i] // k."""
    return x_TD[order_R // k]


def unpermute_combine(
    out_sorted_RD: torch.Tensor, order_R: torch.Tensor, w_TK: torch.Tensor
) -> torch.Tensor:
    """Scatter expert-ordered outputs back to (token, slot) and sum over slots in slot order."""
    T, K = w_TK.shape
    out_RD = torch.empty_like(out_sorted_RD)
    out_RD[order_R] = out_sorted_RD
    return combine_slots(out_RD.view(T, K, -1), w_TK)


def rms_norm(x_TD: torch.Tensor, w_D: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm: normalize in fp32, cast back, then scale (weight multiply in weight/input dtype)."""
    if x_TD.dtype == torch.float32:  # the same ops without the no-op casts
        return w_D * (x_TD * torch.rsqrt(x_TD.pow(2).mean(-1, keepdim=True) + eps))
    x32 = x_TD.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w_D * x32.to(x_TD.dtype)


def moe_combine(h_TD: torch.Tensor, out_TKD: torch.Tensor, w_TK: torch.Tensor,
                s_TD: torch.Tensor | None = None) -> torch.Tensor:
    """The residual stream after an MoE layer: h + sum_k w_k out_k (+ the shared expert's s)."""
    moe_TD = combine_slots(out_TKD.to(h_TD.dtype), w_TK)
    if s_TD is not None:
        moe_TD = moe_TD + s_TD
    return h_TD + moe_TD


def combine_slots(out_TKD: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    """sum_k w_k * out_k in slot order; a fixed order keeps it bitwise deterministic.

    Mirrors transformers 5.24's default (grouped_mm) experts path: the product takes torch's
    promoted dtype (fp32 for Mixtral's fp32 weights, bf16 for Qwen2-MoE/OLMoE in bf16), the
    K products are summed in fp32 and the result is cast to out_TKD's dtype.
    """
    p_TKD = out_TKD * w_TK[..., None]
    if p_TKD.dtype == torch.float32:  # the same sums without the no-op casts
        acc_TD = p_TKD[:, 0]
        for k in range(1, p_TKD.shape[1]):
            acc_TD = acc_TD + p_TKD[:, k]
        return acc_TD if out_TKD.dtype == torch.float32 else acc_TD.to(out_TKD.dtype)
    acc_TD = p_TKD[:, 0].float()
    for k in range(1, p_TKD.shape[1]):
        acc_TD = acc_TD + p_TKD[:, k].float()
    return acc_TD.to(out_TKD.dtype)


def gqa_attention(q_nHd: torch.Tensor, k_LGd: torch.Tensor, v_LGd: torch.Tensor, start_pos: int, scale: float):
    """Causal GQA attention of n new tokens at positions start_pos.. over L keys; returns [n, H*d].
    HF eager numerics: scores in activation dtype, softmax in fp32, cast back, then @ V. The model's
    prefill attention is this function, so prefill and paged decode agree bit for bit."""
    n, H, d = q_nHd.shape
    L, G, _ = k_LGd.shape
    rep = H // G
    k_HLd = k_LGd.permute(1, 0, 2).repeat_interleave(rep, dim=0)
    v_HLd = v_LGd.permute(1, 0, 2).repeat_interleave(rep, dim=0)
    q_Hnd = q_nHd.transpose(0, 1)
    s_HnL = torch.matmul(q_Hnd, k_HLd.transpose(1, 2)) * scale
    q_pos = torch.arange(start_pos, start_pos + n, device=q_nHd.device)
    k_pos = torch.arange(L, device=q_nHd.device)
    future_nL = k_pos[None, :] > q_pos[:, None]
    s_HnL = s_HnL.masked_fill(future_nL[None], float("-inf"))
    p_HnL = torch.softmax(s_HnL, dim=-1, dtype=torch.float32).to(q_nHd.dtype)
    o_Hnd = torch.matmul(p_HnL, v_HLd)
    return o_Hnd.transpose(0, 1).reshape(n, H * d)


def paged_decode_attention(
    q_BHd: torch.Tensor,
    k_NSGd: torch.Tensor,
    v_NSGd: torch.Tensor,
    block_tables: list[list[int]],
    seq_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over its paged KV context (the query is the last of seq_lens[b]
    positions, whose K/V are already written). Position p of sequence b lives in block
    block_tables[b][p // S], row p % S. Returns [B, H*d] in q's dtype."""
    B, H, d = q_BHd.shape
    N, S, G, _ = k_NSGd.shape
    k_XGd, v_XGd = k_NSGd.reshape(N * S, G, d), v_NSGd.reshape(N * S, G, d)
    out = torch.empty(B, H * d, dtype=q_BHd.dtype, device=q_BHd.device)
    for b in range(B):
        L = int(seq_lens[b])
        pos = torch.arange(L)
        table = torch.as_tensor(list(block_tables[b]), dtype=torch.int64)
        slots_L = (table[pos // S] * S + pos % S).to(k_NSGd.device)
        out[b : b + 1] = gqa_attention(
            q_BHd[b : b + 1], k_XGd[slots_L].to(q_BHd.dtype), v_XGd[slots_L].to(q_BHd.dtype), L - 1, scale
        )
    return out


def paged_attention(q_SnHd: torch.Tensor, k_NSGd: torch.Tensor, v_NSGd: torch.Tensor,
                    tables_SM: torch.Tensor, qpos_Sn: torch.Tensor, scale: float,
                    future_SnL: torch.Tensor | None = None) -> torch.Tensor:
    """Batched causal attention of n query rows per sequence over its paged KV context, one call
    for a whole batch (decode: n = 1; prefill: n = the longest prompt chunk, shorter ones padded).
    tables_SM: each sequence's first M cache blocks (M = blocks of the longest context; padding:
    any valid block id); qpos_Sn: absolute position of each query; query (s, i) sees positions
    0..qpos[s, i], so padding past a sequence's length is masked by causality.
    GQA/MQA without repeating K/V: the rep = H/G query heads of a KV head share one matmul.
    Same numerics as gqa_attention (scores in activation dtype, softmax in fp32, cast back).
    future_SnL (optional): the causal mask arange(L) > qpos, when the caller has it already
    (kv.batch builds it once per step for all blocks)."""
    S, n, H, d = q_SnHd.shape
    _, bs, G, _ = k_NSGd.shape
    rep, L = H // G, tables_SM.shape[1] * bs
    # Whole blocks gathered with index_select over a 2-D view (several times faster than on the
    # 4-D cache): M rows of bs*G*d each, not L rows of G*d.
    flat_X = tables_SM.reshape(-1)
    N = k_NSGd.shape[0]
    k_SLGd = k_NSGd.reshape(N, -1).index_select(0, flat_X).view(S, L, G, d)
    v_SLGd = v_NSGd.reshape(N, -1).index_select(0, flat_X).view(S, L, G, d)
    if k_SLGd.dtype != q_SnHd.dtype:
        k_SLGd, v_SLGd = k_SLGd.to(q_SnHd.dtype), v_SLGd.to(q_SnHd.dtype)
    if future_SnL is None:
        future_SnL = torch.arange(L, device=q_SnHd.device)[None, None, :] > qpos_Sn[:, :, None]
    mask_S1nL = future_SnL[:, None]
    if G == 1:  # MQA: one GEMM pair, written straight into the output layout
        s_SmL = torch.matmul(q_SnHd.view(S, n, H, d).transpose(1, 2).reshape(S, H * n, d),
                             k_SLGd[:, :, 0].transpose(1, 2)) * scale
        s_SmL = s_SmL.view(S, H, n, L).masked_fill(mask_S1nL, float("-inf"))
        p_SmL = torch.softmax(s_SmL, dim=-1, dtype=torch.float32).to(q_SnHd.dtype).view(S, H * n, L)
        return torch.matmul(p_SmL, v_SLGd[:, :, 0]).view(S, H, n, d).transpose(1, 2).reshape(S, n, H * d)
    q_SGmd = q_SnHd.view(S, n, G, rep, d).permute(0, 2, 3, 1, 4)
    out_SnGrd = q_SnHd.new_empty(S, n, G, rep, d)
    for g in range(G):  # KV heads: strided views of the gathered blocks go to the GEMMs uncopied
        k_SLd, v_SLd = k_SLGd[:, :, g], v_SLGd[:, :, g]
        s_SmL = torch.matmul(q_SGmd[:, g].reshape(S, rep * n, d), k_SLd.transpose(1, 2)) * scale
        s_SmL = s_SmL.view(S, rep, n, L).masked_fill(mask_S1nL, float("-inf"))
        p_SmL = torch.softmax(s_SmL, dim=-1, dtype=torch.float32).to(q_SnHd.dtype).view(S, rep * n, L)
        out_SnGrd[:, :, g] = torch.matmul(p_SmL, v_SLd).view(S, rep, n, d).transpose(1, 2)
    return out_SnGrd.view(S, n, H * d)
