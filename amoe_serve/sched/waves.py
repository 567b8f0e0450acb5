"""Wave bookkeeping of an AEP attention rank, as pure logic (the clock is passed in), so the
real rank loop and the cluster simulator share it.

Requests on an attention rank travel in W micro-waves (the μ-queue slot is the wave): while the
experts work on one wave, attention runs another. Expert replies come back in pieces, so a
rank that ran whatever had landed would split each wave at every block until batches were a
token or two. The gate keeps waves whole: queue (b, w) is ready only when none of wave w's
segments are still on their way to it (for block 0: when the whole wave is back, so newly
admitted requests join it), when it holds a full batch, or when it has waited max_wait.
The sampler is gated the same way: a wave's finished segments are sampled together once none
of the wave is still at the experts for the last block, because the LM head has a large fixed
cost per call (it streams the whole vocabulary matrix).
"""

from __future__ import annotations

import numpy as np


def auto_waves(on_cpu: bool, compute_ranks_here: int, threads_per_rank: int, cores: int) -> int:
    """Waves for `scheduler.attention_waves: 0`. A second wave pays off by overlapping one
    wave's attention with another's expert work on other devices; it also halves every batch
    (twice the steps, messages and per-step costs for the same tokens). Ranks on their own GPUs
    overlap, so 2. CPU ranks overlap only when each has its own cores: when a node's compute
    ranks need more cores than it has, nothing runs beside the attention rank that the second
    wave could hide, and one wave is faster (docs/bench/overhead)."""
    if not on_cpu:
        return 2
    return 2 if compute_ranks_here * max(1, threads_per_rank) <= cores else 1


def _decrement(row: np.ndarray, idx: list[int]) -> None:
    """row[i] -= 1 for each i of idx (repeats count): a wave or two per call, where
    np.subtract.at costs several µs of set-up per call on the rank's hot loop."""
    for i in idx:
        row[i] -= 1


class WaveGate:
    def __init__(self, num_blocks: int, waves: int, max_batch_tokens: int, max_wait_s: float,
                 min_wave_requests: int = 1):
        self.NB, self.W = num_blocks, waves
        self.min_wave_requests = min_wave_requests
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.incoming_BW = np.zeros((num_blocks, waves), dtype=np.int64)  # next stop (b, w)
        self.in_flight_W = np.zeros(waves, dtype=np.int64)  # between block 0 and sampling
        self.since_BW = np.zeros((num_blocks, waves))
        self.since_sample_W = np.zeros(waves)

    def pick_wave(self, running_waves: list[int]) -> int:
        """The least-loaded wave for a new request, among as many waves as the load fills with
        min_wave_requests each: splitting a few requests only multiplies per-step costs."""
        active = max(1, min(self.W, (len(running_waves) + 1) // self.min_wave_requests))
        return int(np.argmin(np.bincount(running_waves, minlength=self.W)[:active]))

    def queued(self, b: int, w: int, was_empty: bool, now: float) -> None:
        if was_empty:
            self.since_BW[b, w] = now

    def dispatched(self, b: int, w: int, num_segments: int, merged_into: int | None = None) -> None:
        """Attention of block b ran for num_segments segments of wave w; they are at the experts
        (as merged_into segments, when attention merged them; default: as they came)."""
        out = num_segments if merged_into is None else merged_into
        self.incoming_BW[(b + 1) % self.NB, w] += out
        if b == 0:
            self.in_flight_W[w] += out
        else:
            self.in_flight_W[w] -= num_segments - out

    def returned(self, b: int, waves: list[int]) -> None:
        """Segments (their waves) completed block b's expert outputs."""
        _decrement(self.incoming_BW[(b + 1) % self.NB], waves)

    def sampled(self, waves: list[int]) -> None:
        _decrement(self.in_flight_W, waves)

    def sample_queued(self, w: int, was_empty: bool, now: float) -> None:
        """A segment of wave w finished the last block (was_empty: none of w was waiting)."""
        if was_empty:
            self.since_sample_W[w] = now

    def sample_ready(self, w: int, now: float) -> bool:
        """Sample wave w's finished segments now: none of the wave is still at the experts for
        the last block, or the first of them has waited max_wait."""
        return self.incoming_BW[0, w] == 0 or now - self.since_sample_W[w] >= self.max_wait_s

    def ready(self, Q_BW: np.ndarray, now: float) -> np.ndarray:
        """Q with the queues that should keep waiting masked to 0 (a copy only when needed)."""
        expect_BW = self.incoming_BW.copy()
        expect_BW[0] = self.in_flight_W
        waiting = (expect_BW > 0) & (Q_BW < self.max_batch_tokens)
        if waiting.any():
            waiting &= (now - self.since_BW) < self.max_wait_s
            if waiting.any():
                Q_BW = Q_BW.copy()
                Q_BW[waiting] = 0
        return Q_BW
