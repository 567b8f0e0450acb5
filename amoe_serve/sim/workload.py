"""Simulated requests and routing: the workload (arrival times, prompt and output lengths) and a
seeded router with the AMoE paper's exponential skew (expert of popularity rank i has
probability ~ exp(-rate * i); with per_block the hottest expert differs per block)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Workload:
    arrival_s: np.ndarray
    prompt: np.ndarray
    output: np.ndarray


def make_workload(n: int, input_len, output_len, arrival: str, rate: float, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(input_len[0], input_len[1] + 1, size=n)
    output = rng.integers(output_len[0], output_len[1] + 1, size=n)
    if arrival == "poisson":
        arr = np.cumsum(rng.exponential(1.0 / rate, size=n))
    else:
        arr = np.zeros(n)
    return Workload(arr, prompt, output)


def popularity(num_experts: int, rate: float, num_blocks: int, per_block: bool, seed: int) -> np.ndarray:
    """p_BE: each block's expert probabilities (a seeded permutation of exp(-rate * i))."""
    rng = np.random.default_rng(seed)
    base = np.exp(-rate * np.arange(num_experts))
    base /= base.sum()
    p_BE = np.empty((num_blocks, num_experts))
    perm = rng.permutation(num_experts)
    for b in range(num_blocks):
        if per_block:
            perm = rng.permutation(num_experts)
        p_BE[b, perm] = base
    return p_BE


class Router:
    """Rows per expert of a batch, drawn from p_BE; each rank draws its own stream. top-k without
    replacement by Gumbel-top-k (Plackett-Luce) over the same probabilities."""

    def __init__(self, p_BE: np.ndarray, top_k: int, seed: int, stream: int = 0) -> None:
        self.p_BE, self.k = p_BE, top_k
        self.E = p_BE.shape[1]
        with np.errstate(divide="ignore"):
            self.logp_BE = np.log(p_BE)
        self.rng = np.random.default_rng([seed + 1, stream])

    def counts(self, block: int, tokens: int) -> np.ndarray:
        """Rows per expert, [E] (sums to tokens * k)."""
        if tokens <= 0:
            return np.zeros(self.E, dtype=np.int64)
        if self.k == 1:
            return self.rng.multinomial(tokens, self.p_BE[block])
        g = self.logp_BE[block] + self.rng.gumbel(size=(tokens, self.E))
        ids = np.argpartition(-g, self.k - 1, axis=1)[:, : self.k]
        return np.bincount(ids.ravel(), minlength=self.E)

    def counts_A(self, block: int, tokens_A: np.ndarray) -> np.ndarray:
        """Rows per (rank, expert) for several ranks' batches at once, [A, E]."""
        if self.k == 1:
            return self.rng.multinomial(np.asarray(tokens_A, dtype=np.int64), self.p_BE[block])
        return np.stack([self.counts(block, int(t)) for t in tokens_A])
