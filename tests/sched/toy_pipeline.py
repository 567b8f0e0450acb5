"""Deterministic discrete-time toy pipeline for exercising scheduling policies.

One rank, NB blocks, one μ-queue per block (slot 0). Each step: arrivals are
pushed into the queues, then the scheduler picks one queue and runs it; running
block b moves all its tokens to block b+1, and the last block's tokens complete.
One step = one executed batch, whatever its size, which is the regime where batch
size matters (GEMM time is nearly flat in tokens at small batch sizes).

Pure logic: the simulator can reuse it to sanity-check a policy before scaling up.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from amoe_serve.sched.policies import Scheduler
from amoe_serve.sched.queues import MuQueues

# arrivals(step) -> iterable of (block, num_tokens) entering at that step
Arrivals = Callable[[int], Iterable[tuple[int, int]]]


@dataclass
class ToyStats:
    steps: int = 0
    idle_steps: int = 0
    completed_tokens: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    picks: list[int] = field(default_factory=list)  # block run at each busy step

    @property
    def mean_batch(self) -> float:
        return sum(self.batch_sizes) / len(self.batch_sizes) if self.batch_sizes else 0.0


class ToyPipeline:
    def __init__(self, num_blocks: int, scheduler: Scheduler, closed_loop: bool = False) -> None:
        # closed_loop: a token finishing the last block re-enters block 0 (the next
        # decode step), which is why Defrag's look-ahead wraps modulo NB.
        self.num_blocks = num_blocks
        self.closed_loop = closed_loop
        self.scheduler = scheduler
        self.queues = MuQueues(num_blocks, 1)
        self.stats = ToyStats()

    def push(self, block: int, num_tokens: int) -> None:
        if num_tokens > 0:
            self.queues.push(block, 0, num_tokens, num_tokens)

    def step(self, arrivals: Iterable[tuple[int, int]] = ()) -> int | None:
        """Admit arrivals, run one queue; returns the block run (None if idle)."""
        for block, n in arrivals:
            self.push(block, n)
        self.stats.steps += 1
        choice = self.scheduler.pick(self.queues.lengths)
        if choice is None:
            self.stats.idle_steps += 1
            return None
        block, slot = choice
        n = sum(self.queues.pop(block, slot))
        self.stats.batch_sizes.append(n)
        self.stats.picks.append(block)
        if block + 1 < self.num_blocks:
            # Merge into one item: tokens of a layer run together anyway.
            self.push(block + 1, n)
        else:
            self.stats.completed_tokens += n
            if self.closed_loop:
                self.push(0, n)
        return block

    def run(self, num_steps: int, arrivals: Arrivals | None = None) -> ToyStats:
        for t in range(num_steps):
            self.step(arrivals(t) if arrivals is not None else ())
        return self.stats

    def drain(self, max_steps: int = 1_000_000) -> ToyStats:
        """Run with no arrivals until empty (bounded so a bad policy cannot hang).

        A closed loop never empties; it just runs max_steps.
        """
        for _ in range(max_steps):
            if self.queues.is_empty():
                break
            self.step()
        return self.stats
