"""amoe_kernels: MoE operators (PyTorch reference today; Triton on CUDA later) behind one dispatcher."""

from .dispatch import combine_slots, expert_ffn, grouped_expert_ffn, permute, topk_gating, unpermute_combine

__all__ = ["combine_slots", "expert_ffn", "grouped_expert_ffn", "permute", "topk_gating", "unpermute_combine"]
