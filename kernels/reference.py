"""Pure-PyTorch reference MoE operators (no shape checks: see `amoe_kernels.checks`).

Legend: T=tokens, D=hidden, F=expert ffn, E=experts, K=top-k slots, G=experts in a group,
R=T*K routed rows.
"""

from __future__ import annotations

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
) -> torch.Tensor:
    """Rows are sorted by expert: the first counts[0] rows go to expert 0 of the group, etc."""
    y_TD = torch.empty_like(x_TD)
    start = 0
    for g, n in enumerate(counts_G):
        if n:
            y_TD[start : start + n] = expert_ffn(x_TD[start : start + n], w1_GFD[g], w3_GFD[g], w2_GDF[g])
        start += n
    return y_TD


def topk_gating(
    logits_TE: torch.Tensor, k: int, renormalize: bool, weight_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF routing: softmax in fp32, top-k, optional renormalization, then cast.

    weight_dtype=None keeps fp32 (Mixtral); Qwen2-MoE / OLMoE pass the logits dtype.
    """
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


def unpermute_combine(
    out_sorted_RD: torch.Tensor, order_R: torch.Tensor, w_TK: torch.Tensor
) -> torch.Tensor:
    """Scatter expert-ordered outputs back to (token, slot) and sum over slots in slot order."""
    T, K = w_TK.shape
    out_RD = torch.empty_like(out_sorted_RD)
    out_RD[order_R] = out_sorted_RD
    return combine_slots(out_RD.view(T, K, -1), w_TK)


def combine_slots(out_TKD: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    """sum_k w_k * out_k in slot order; a fixed order keeps it bitwise deterministic.

    Mirrors transformers 5.24's default (grouped_mm) experts path: the product takes torch's
    promoted dtype (fp32 for Mixtral's fp32 weights, bf16 for Qwen2-MoE/OLMoE in bf16), the
    K products are summed in fp32 and the result is cast to out_TKD's dtype.
    """
    p_TKD = out_TKD * w_TK[..., None]
    acc_TD = p_TKD[:, 0].float()
    for k in range(1, p_TKD.shape[1]):
        acc_TD = acc_TD + p_TKD[:, k].float()
    return acc_TD.to(out_TKD.dtype)
