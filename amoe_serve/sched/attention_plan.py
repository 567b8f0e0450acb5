"""What an AEP attention rank decides, as pure logic (the clock is passed in): the one copy that
the rank loop (`engine/attention_rank.py`) and the cluster simulator (`sim/aep.py`) both call.

Decisions: which wave a new request joins, which (block, wave) queue runs next and which of its
segments (up to `max_batch_tokens`; the rank merges them into one), the wave bookkeeping of
`WaveGate` on every push / dispatch / return, and when a wave's finished segments are sampled.
Items are opaque (the rank's `Segment`, the simulator's `SimSegment`); their wave and token count
are passed beside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .queues import MuQueues
from .waves import WaveGate


@dataclass
class AttentionBatch:
    block: int
    wave: int
    items: list        # segments popped, in FIFO order (merged into one by the rank)
    tokens: int


class AttentionPlan:
    def __init__(self, num_blocks: int, waves: int, max_batch_tokens: int, max_wait_s: float,
                 scheduler, min_wave_requests: int = 1, gated: bool = True):
        self.NB = num_blocks
        self.max_batch_tokens = max_batch_tokens
        self.scheduler = scheduler
        self.queues = MuQueues(num_blocks, waves)          # slot = wave
        # Lockstep runs ungated (the barrier keeps its one wave whole).
        self.gate: Optional[WaveGate] = (WaveGate(num_blocks, waves, max_batch_tokens, max_wait_s,
                                                  min_wave_requests) if gated else None)
        self.to_sample: list[tuple[Any, int]] = []       # (item, wave) past the last block

    def ungate(self) -> None:
        self.gate = None

    # ---- arrivals ------------------------------------------------------------------------------
    def wave_for(self, running_waves: list[int]) -> int:
        return self.gate.pick_wave(running_waves) if self.gate is not None else 0

    def push(self, b: int, w: int, item: Any, num_tokens: int, now: float) -> None:
        if self.gate is not None:
            self.gate.queued(b, w, self.queues.lengths[b, w] == 0, now)
        self.queues.push(b, w, item, num_tokens)

    def returned(self, b: int, done: list[tuple[Any, int, int]], now: float) -> None:
        """Segments (item, wave, tokens) whose block-b expert outputs are all back: on to block
        b+1's queue, or to the sampler after the last block."""
        if not done:
            return
        if self.gate is not None:
            self.gate.returned(b, [w for _, w, _ in done])
        waiting = None  # waves with segments waiting for the sampler (built once per call)
        for item, w, n in done:
            if b + 1 < self.NB:
                self.push(b + 1, w, item, n, now)
                continue
            if self.gate is not None:
                if waiting is None:
                    waiting = {ww for _, ww in self.to_sample}
                self.gate.sample_queued(w, w not in waiting, now)
                waiting.add(w)
            self.to_sample.append((item, w))

    # ---- decisions -----------------------------------------------------------------------------
    def sample_batch(self, now: float) -> list:
        """Finished segments to sample now: one LM-head call per wave once none of the wave is
        still at the experts for the last block (or it waited max_wait); all of them ungated."""
        if not self.to_sample:
            return []
        pending, self.to_sample = self.to_sample, []
        if self.gate is None:
            return [it for it, _ in pending]
        ready = {w for w in {w for _, w in pending} if self.gate.sample_ready(w, now)}
        self.to_sample = [(it, w) for it, w in pending if w not in ready]
        out = [(it, w) for it, w in pending if w in ready]
        if out:
            self.gate.sampled([w for _, w in out])
        return [it for it, _ in out]

    def next_batch(self, now: float) -> Optional[AttentionBatch]:
        """The queue the scheduler picks among the gate's ready ones, popped; None when idle."""
        if self.queues.total() == 0:  # most wake-ups of a rank waiting on its experts
            return None
        Q = self.queues.lengths
        pick = self.scheduler.pick(self.gate.ready(Q, now) if self.gate is not None else Q)
        if pick is None:
            return None
        b, w = pick
        before = int(Q[b, w])
        items = self.queues.pop(b, w, self.max_batch_tokens)
        if self.gate is not None:
            self.gate.dispatched(b, w, len(items), merged_into=1)  # the rank merges them
        return AttentionBatch(b, w, items, before - int(self.queues.lengths[b, w]))

    def next_wake(self, now: float) -> Optional[float]:
        """When a held queue's max_wait runs out (a simulator's stand-in for polling)."""
        if self.gate is None or (self.queues.total() == 0 and not self.to_sample):
            return None  # the usual wait for expert replies: nothing held, no numpy
        held = self.queues.lengths > 0
        times = [float(self.gate.since_BW[held].min()) + self.gate.max_wait_s] if held.any() else []
        if self.to_sample:
            times.append(min(float(self.gate.since_sample_W[w]) for _, w in self.to_sample) + self.gate.max_wait_s)
        return max(min(times), now) if times else None
