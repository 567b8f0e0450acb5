"""Local greedy generation: the correctness oracle for the split model.

Runs AttentionSide + ExpertSide(all experts) + PagedKVCache one request at a time.
Legend: T=tokens, D=hidden, K=top-k, R=T*K routed rows, E=experts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

import amoe_kernels as K

from amoe_serve.kv.cache import PagedKVCache
from amoe_serve.model.attention_side import AttentionSide, AttnSegment
from amoe_serve.model.expert_side import ExpertSide


@torch.inference_mode()
def moe_block_local(attn: AttentionSide, experts: ExpertSide, b: int, h_TD: torch.Tensor) -> torch.Tensor:
    """Routed + shared experts of block b for all tokens, then combine."""
    spec = attn.spec
    T, D = h_TD.shape
    y_TD = attn.moe_input(b, h_TD)
    ids_TK, w_TK = attn.route(b, y_TD)
    order_R, counts_E = K.permute(ids_TK, spec.num_experts)
    y_RD = y_TD[order_R // spec.top_k]
    out_sorted_RD = experts.run_grouped(b, list(range(spec.num_experts)), counts_E.tolist(), y_RD)
    out_RD = torch.empty_like(out_sorted_RD)
    out_RD[order_R] = out_sorted_RD
    return attn.combine(h_TD, out_RD.view(T, spec.top_k, D), w_TK, attn.shared_expert(b, y_TD))


@torch.inference_mode()
def forward_local(attn, experts, ids_T, segments, kv) -> torch.Tensor:
    """All blocks for a batch of segments; returns the final hidden states x_TD."""
    x_TD = attn.embed(ids_T)
    for b in range(attn.spec.num_blocks):
        h_TD = attn.attention(b, x_TD, segments, kv)
        x_TD = moe_block_local(attn, experts, b, h_TD)
    return x_TD


def generate_greedy_local(
    path: str | Path,
    prompts: list[list[int]],
    max_new_tokens: int,
    dtype: Optional[torch.dtype],
    block_size: int = 4,
    prefill_chunk: Optional[int] = None,
    stop_at_eos: bool = True,
) -> list[list[int]]:
    """Greedy continuation (new tokens only) of each prompt; stops after an EOS like HF generate."""
    attn = AttentionSide.load(path, dtype)
    spec = attn.spec
    experts = ExpertSide.load(path, spec, dtype, [(b, e) for b in range(spec.num_blocks) for e in range(spec.num_experts)])
    results = []
    for prompt in prompts:
        if not prompt:
            raise ValueError("generate_greedy_local: empty prompt")
        total = len(prompt) + max_new_tokens
        nblocks = -(-total // block_size)
        kv = PagedKVCache(spec, nblocks, block_size, attn.dtype)
        table = list(reversed(range(nblocks)))  # deliberately non-contiguous order exercises paging
        chunk = prefill_chunk or len(prompt)
        pos, logits_V = 0, None
        while pos < len(prompt):
            n = min(chunk, len(prompt) - pos)
            seg = AttnSegment(pos, n, table)
            x_TD = forward_local(attn, experts, torch.tensor(prompt[pos : pos + n]), [seg], kv)
            logits_V = attn.logits(x_TD[-1:])[0]
            pos += n
        out: list[int] = []
        for step in range(max_new_tokens):
            tok = int(torch.argmax(logits_V))
            out.append(tok)
            if (stop_at_eos and tok in spec.eos_token_ids) or step == max_new_tokens - 1:
                break
            x_TD = forward_local(attn, experts, torch.tensor([tok]), [AttnSegment(pos, 1, table)], kv)
            logits_V = attn.logits(x_TD)[0]
            pos += 1
        results.append(out)
    return results
