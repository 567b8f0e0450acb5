"""amoe_kernels: MoE and decode-attention operators behind one dispatcher.

Triton kernels on CUDA tensors, pure-PyTorch references otherwise (see dispatch.py);
launch parameters live in configs/*.json (see tuning.py); `python -m amoe_kernels.bench`.
"""

from .dispatch import (
    attn_decode_block,
    attn_post,
    attn_pre,
    backend_for,
    combine_slots,
    dispatch_rows,
    expert_ffn,
    grouped_expert_ffn,
    linear,
    moe_combine,
    paged_attention,
    paged_decode_attention,
    permute,
    permute_tokens,
    pool_scatter,
    rms_norm,
    rope_kv_write,
    route,
    set_linear_threads,
    topk_gating,
    unpermute_combine,
)

__all__ = [
    "attn_decode_block",
    "attn_post",
    "attn_pre",
    "backend_for",
    "combine_slots",
    "dispatch_rows",
    "expert_ffn",
    "grouped_expert_ffn",
    "linear",
    "moe_combine",
    "paged_attention",
    "paged_decode_attention",
    "permute",
    "permute_tokens",
    "pool_scatter",
    "rms_norm",
    "rope_kv_write",
    "route",
    "set_linear_threads",
    "topk_gating",
    "unpermute_combine",
]
