"""Operator entry points: validate shapes, then pick a backend.

Today every op runs the PyTorch reference; a Triton backend for CUDA tensors plugs in here.
"""

from __future__ import annotations

import torch

from . import checks, reference


def backend_for(t: torch.Tensor) -> str:
    return "reference"


def expert_ffn(x_TD, w1_FD, w3_FD, w2_DF):
    checks.expert_ffn(x_TD, w1_FD, w3_FD, w2_DF)
    return reference.expert_ffn(x_TD, w1_FD, w3_FD, w2_DF)


def grouped_expert_ffn(x_TD, counts_G, w1_GFD, w3_GFD, w2_GDF):
    counts_G = [int(c) for c in counts_G]
    checks.grouped_expert_ffn(x_TD, counts_G, w1_GFD, w3_GFD, w2_GDF)
    return reference.grouped_expert_ffn(x_TD, counts_G, w1_GFD, w3_GFD, w2_GDF)


def topk_gating(logits_TE, k: int, renormalize: bool, scoring: str = "softmax", weight_dtype=None):
    if scoring != "softmax":
        raise ValueError(f"topk_gating: scoring {scoring!r} is not supported (only 'softmax')")
    checks.topk_gating(logits_TE, k)
    return reference.topk_gating(logits_TE, k, renormalize, weight_dtype)


def permute(ids_TK, num_experts: int | None = None):
    """num_experts=None infers max id + 1 (pass it explicitly to get a fixed-length counts_E)."""
    if num_experts is None:
        num_experts = int(ids_TK.max()) + 1 if ids_TK.numel() else 0
    checks.permute(ids_TK, num_experts)
    return reference.permute(ids_TK, num_experts)


def combine_slots(out_TKD, w_TK):
    checks.combine_slots(out_TKD, w_TK)
    return reference.combine_slots(out_TKD, w_TK)


def unpermute_combine(out_sorted_RD, order_R, w_TK):
    checks.unpermute_combine(out_sorted_RD, order_R, w_TK)
    return reference.unpermute_combine(out_sorted_RD, order_R, w_TK)
