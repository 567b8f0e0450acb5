"""Per-rank scheduling counters, cheap enough to leave on in production.

Legend: NB = blocks, NS = slots per block. Per-layer arrays are [NB, NS] numpy
matrices updated in place (O(1) per batch; O(NB*NS) vector op per depth sample).
Time is passed in by the caller (seconds), never read here, so a simulator can
drive the same counters with virtual time.
"""
from __future__ import annotations

import numpy as np


# sample_queue_depths takes a sample at most this often: the rank loops call it every turn, and
# with a turn per expert reply a sample each time paid its numpy calls several times per block
# (~2% of a rank's CPU).
DEPTH_SAMPLE_S = 5e-4


def _bucket(n: int) -> int:
    """Power-of-two histogram bucket: the smallest power of two >= n (n >= 1)."""
    return 1 << (int(n) - 1).bit_length()


class RankCounters:
    """Per (block, slot) tokens and batches executed, executed batch-size histogram
    (power-of-two buckets), busy and idle seconds, queue-depth samples (max and
    time-weighted mean per layer)."""

    def __init__(self, num_blocks: int, num_slots: int) -> None:
        if num_blocks < 1 or num_slots < 1:
            raise ValueError(f"num_blocks and num_slots must be >= 1, got {num_blocks}, {num_slots}")
        shape = (num_blocks, num_slots)
        # Per-batch counts in Python lists: a scalar += there is ~0.1 µs, a numpy element's 1-5.
        self._tokens = [[0] * num_slots for _ in range(num_blocks)]
        self._batches = [[0] * num_slots for _ in range(num_blocks)]
        self.batch_hist: dict[int, int] = {}
        self.busy_s = 0.0
        self.idle_s = 0.0
        self.depth_max_BS = np.zeros(shape, dtype=np.int64)
        self._depth_time_sum_BS = np.zeros(shape, dtype=np.float64)  # sum of depth * dt
        self._depth_tmp_BS = np.zeros(shape, dtype=np.float64)
        self._depth_time_s = 0.0
        self._depth_last: float | None = None  # when sample_queue_depths last sampled

    def record_batch(self, block: int, slot: int, num_tokens: int) -> None:
        if num_tokens < 1:
            raise ValueError(f"an executed batch has >= 1 token, got {num_tokens}")
        self._tokens[block][slot] += num_tokens
        self._batches[block][slot] += 1
        b = _bucket(num_tokens)
        self.batch_hist[b] = self.batch_hist.get(b, 0) + 1

    def record_batches(self, block: int, slots: list[int], num_tokens: list[int]) -> None:
        """record_batch(block, slots[i], num_tokens[i]) for every i (distinct slots): one grouped
        step's queues."""
        if min(num_tokens) < 1:
            raise ValueError(f"an executed batch has >= 1 token, got {min(num_tokens)}")
        tokens, batches, hist = self._tokens[block], self._batches[block], self.batch_hist
        for s, n in zip(slots, num_tokens):
            tokens[s] += n
            batches[s] += 1
            b = _bucket(n)
            hist[b] = hist.get(b, 0) + 1

    @property
    def tokens_BS(self) -> np.ndarray:
        return np.array(self._tokens, dtype=np.int64)

    @property
    def batches_BS(self) -> np.ndarray:
        return np.array(self._batches, dtype=np.int64)

    def record_busy(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"busy seconds must be >= 0, got {seconds}")
        self.busy_s += float(seconds)

    def record_idle(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"idle seconds must be >= 0, got {seconds}")
        self.idle_s += float(seconds)

    def sample_queue_depths(self, lengths: np.ndarray, now: float) -> None:
        """record_queue_depths for the time since the last sample, if at least DEPTH_SAMPLE_S
        has passed (the first call only starts the clock)."""
        if self._depth_last is None:
            self._depth_last = now
        elif now - self._depth_last >= DEPTH_SAMPLE_S:
            self.record_queue_depths(lengths, now - self._depth_last)
            self._depth_last = now

    def record_queue_depths(self, lengths: np.ndarray, dt: float) -> None:
        """Sample the queue-length matrix, weighting it by the dt it was held for."""
        if lengths.shape != self.depth_max_BS.shape:
            raise ValueError(f"lengths shape {lengths.shape} != counters shape {self.depth_max_BS.shape}")
        if dt < 0:
            raise ValueError(f"dt must be >= 0, got {dt}")
        np.maximum(self.depth_max_BS, lengths, out=self.depth_max_BS)
        if dt > 0:  # in place: a rank samples on every loop
            np.multiply(lengths, dt, out=self._depth_tmp_BS)
            np.add(self._depth_time_sum_BS, self._depth_tmp_BS, out=self._depth_time_sum_BS)
            self._depth_time_s += float(dt)

    def to_dict(self) -> dict:
        """JSON-able summary (lists, ints, floats; histogram keys are strings)."""
        tokens_BS, batches_BS = self.tokens_BS, self.batches_BS
        total_batches = int(batches_BS.sum())
        total_tokens = int(tokens_BS.sum())
        wall = self.busy_s + self.idle_s
        depth_mean_BS = (
            self._depth_time_sum_BS / self._depth_time_s if self._depth_time_s > 0 else np.zeros_like(self._depth_time_sum_BS)
        )
        return {
            "num_ranks": 1,
            "tokens_per_layer": tokens_BS.tolist(),
            "batches_per_layer": batches_BS.tolist(),
            "total_tokens": total_tokens,
            "total_batches": total_batches,
            "mean_batch": total_tokens / total_batches if total_batches else 0.0,
            "batch_hist": {str(k): v for k, v in sorted(self.batch_hist.items())},
            "busy_s": self.busy_s,
            "idle_s": self.idle_s,
            "idle_fraction": self.idle_s / wall if wall > 0 else 0.0,
            "queue_depth_max": self.depth_max_BS.tolist(),
            "queue_depth_mean": depth_mean_BS.tolist(),
            "queue_depth_time_s": self._depth_time_s,  # kept so summaries can be merged with weighted means
        }
