"""What the sampler remembers about one request between steps: only what its parameters need
(token counts for the presence/frequency penalties, a seen-mask for the repetition penalty, a
grammar matcher), so a plain request carries nothing."""
from __future__ import annotations

from typing import Optional

import torch

from amoe_serve.sampler.params import SamplingParams


class RowState:
    def __init__(self, params: SamplingParams, prompt: list[int], vocab_size: int,
                 eos_token_ids: tuple[int, ...] = (), matcher=None):
        self.params = params
        self.vocab_size = vocab_size
        self.num_generated = 0
        self.matcher = matcher  # sampler.grammar.Matcher or None
        self.counts_V: Optional[torch.Tensor] = None
        self.seen_V: Optional[torch.Tensor] = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts_V = torch.zeros(vocab_size, dtype=torch.float32)
        if params.repetition_penalty != 1.0:
            self.seen_V = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen_V[torch.tensor(prompt, dtype=torch.long)] = True
        self.bias_ids: Optional[torch.Tensor] = None
        if params.logit_bias:
            self.bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
            self.bias_vals = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
        # min_tokens masks EOS as well as stop_token_ids (vLLM), even with ignore_eos.
        stop = sorted(set(params.stop_token_ids) | set(eos_token_ids))
        self.min_stop_ids = torch.tensor([t for t in stop if t < vocab_size], dtype=torch.long)

    def accept(self, token: int) -> None:
        self.num_generated += 1
        if self.counts_V is not None:
            self.counts_V[token] += 1
        if self.seen_V is not None:
            self.seen_V[token] = True
        if self.matcher is not None:
            self.matcher.accept(token)
