"""This machine's best GEMM rate for the model's shapes, and the FLOPs a run performed."""

from __future__ import annotations

import time

import torch


def best_gemm_flops(D: int, F: int, rows: int = 512, repeats: int = 5) -> float:
    """Best single-thread fp32 FLOP/s of the expert up-projection shape [rows, D] x [D, F]."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, w = torch.randn(rows, D), torch.randn(F, D)
        a @ w.T
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            a @ w.T
            best = min(best, time.perf_counter() - t)
        return 2.0 * rows * D * F / best
    finally:
        torch.set_num_threads(prev)


def run_flops(spec, tokens_per_block: float, expert_rows: float, sampled_tokens: float, mean_ctx: float) -> float:
    """Attention-side FLOPs (projections + scores) for every token of every block, expert FLOPs
    for every routed row, LM head for every sampled token."""
    D, H, G, d, F, V = (spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                        spec.expert_intermediate_size, spec.vocab_size)
    per_token_attn = 2 * D * (H * d + 2 * G * d) + 2 * H * d * D + 4 * mean_ctx * H * d
    return tokens_per_block * per_token_attn + expert_rows * 3 * 2 * D * F + sampled_tokens * 2 * D * V
