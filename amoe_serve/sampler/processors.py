"""Logit processing before sampling, in vLLM's order: min_tokens, logit_bias, the repetition,
frequency and presence penalties, then a grammar's token mask. Only the rows of requests that
ask for one of them are touched.

Legend: b rows being processed, V vocab.
"""
from __future__ import annotations

import torch

from amoe_serve.sampler.state import RowState
from amoe_serve.sampler.grammar import apply_masks


def process(logits_bV: torch.Tensor, states: list[RowState]) -> torch.Tensor:
    """Processed fp32 logits for these rows (a new tensor; the input is not changed)."""
    x_bV = logits_bV.to(torch.float32, copy=True)
    neg_inf = float("-inf")
    for i, s in enumerate(states):  # rows that asked for processing only
        p = s.params
        if p.min_tokens and s.num_generated < p.min_tokens and s.min_stop_ids.numel():
            x_bV[i, s.min_stop_ids] = neg_inf
        if s.bias_ids is not None:
            x_bV[i].index_add_(0, s.bias_ids, s.bias_vals)
    rep = [i for i, s in enumerate(states) if s.seen_V is not None]
    if rep:
        idx = torch.tensor(rep)
        seen_rV = torch.stack([states[i].seen_V for i in rep])
        pen_r1 = torch.tensor([states[i].params.repetition_penalty for i in rep], dtype=torch.float32)[:, None]
        x_rV = x_bV[idx]
        # vLLM/HF: divide positive logits, multiply negative ones, for tokens already seen.
        scaled_rV = torch.where(x_rV > 0, x_rV / pen_r1, x_rV * pen_r1)
        x_bV[idx] = torch.where(seen_rV, scaled_rV, x_rV)
    fp = [i for i, s in enumerate(states) if s.counts_V is not None]
    if fp:
        idx = torch.tensor(fp)
        counts_fV = torch.stack([states[i].counts_V for i in fp])
        freq_f1 = torch.tensor([states[i].params.frequency_penalty for i in fp], dtype=torch.float32)[:, None]
        pres_f1 = torch.tensor([states[i].params.presence_penalty for i in fp], dtype=torch.float32)[:, None]
        x_bV[idx] -= freq_f1 * counts_fV + pres_f1 * (counts_fV > 0).to(torch.float32)
    gram = [i for i, s in enumerate(states) if s.matcher is not None]
    if gram:
        apply_masks(x_bV, [states[i].matcher for i in gram], gram)
    return x_bV
