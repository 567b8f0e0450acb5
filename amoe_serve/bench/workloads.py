"""The AMoE paper's workloads: uniform input/output lengths, Poisson arrivals."""

from __future__ import annotations

import random
from dataclasses import dataclass

# name -> ((input min, input max), (output min, output max)), in tokens
WORKLOADS = {
    "short": ((30, 70), (70, 130)),
    "medium": ((50, 150), (50, 250)),
    "reasonable": ((100, 300), (100, 500)),
    # Not the paper's: the short prompts with a quarter of the output, for models that decode at
    # a few tokens/s on this machine (the full-size bench).
    "brief": ((30, 70), (16, 32)),
}


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int
    arrival_s: float  # offset from the start of the run


def make_requests(workload: str, n: int, rate: float, vocab: int, seed: int) -> list[BenchRequest]:
    """n requests; rate > 0: exponential inter-arrival times (Poisson), rate 0: all at t=0."""
    (ilo, ihi), (olo, ohi) = WORKLOADS[workload]
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        if rate > 0:
            t += rng.expovariate(rate)
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(ilo, ihi))]
        out.append(BenchRequest(prompt, rng.randint(olo, ohi), t))
    return out
