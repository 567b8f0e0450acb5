"""What an AEP expert rank decides, as pure logic: which block runs, which of its queues run
together (one grouped GEMM), and how many rows each gives under the step's row budget. The one
copy that `engine/expert_core.py` and the simulator (`sim/aep.py`) call."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .queues import MuQueues


class ExpertGate:
    """Holds a block's queues until they have `min_rows` rows or their oldest row has waited
    `max_wait_s`. An expert step re-reads the weights of every expert it runs, so when many
    attention ranks each send a few rows, running them as they land costs one weight read per
    sender; waiting a little batches them into one step. min_rows 0: off (run whatever landed).

    Legend: B blocks, S local queue slots."""

    def __init__(self, num_blocks: int, min_rows: int = 0, max_wait_s: float = 0.0) -> None:
        self.min_rows = int(min_rows)
        self.max_wait_s = float(max_wait_s)
        self.since_B = np.full(num_blocks, math.inf)  # when the block's oldest waiting row landed

    @property
    def enabled(self) -> bool:
        return self.min_rows > 0

    def pushed(self, b: int, now: float) -> None:
        if self.since_B[b] == math.inf:
            self.since_B[b] = now

    def ran(self, b: int, rows_left: int) -> None:
        if rows_left == 0:
            self.since_B[b] = math.inf

    def ready(self, Q_BS: np.ndarray, now: float) -> np.ndarray:
        """Q with the blocks that should keep waiting masked to 0 (a copy only when needed)."""
        rows_B = Q_BS.sum(axis=1)
        # The same sum as next_deadline(), so a wake-up at the deadline always finds the block ready.
        hold_B = (rows_B > 0) & (rows_B < self.min_rows) & (now < self.since_B + self.max_wait_s)
        if not hold_B.any():
            return Q_BS
        Q_BS = Q_BS.copy()
        Q_BS[hold_B] = 0
        return Q_BS

    def next_deadline(self) -> float:
        """When the earliest held block becomes ready by waiting (inf: nothing waits)."""
        return float(self.since_B.min()) + self.max_wait_s


@dataclass
class ExpertStep:
    block: int
    slots: list[int]        # local queues run, in execution order
    items: list[list]       # items popped per slot
    rows: list[int]         # rows per slot


def _pop(queues: MuQueues, b: int, slots: list[int], budget: Optional[int]) -> Optional[ExpertStep]:
    step = ExpertStep(b, [], [], [])
    left = budget
    for s in slots:
        if left is not None and left <= 0:
            break
        before = int(queues.lengths[b, s])
        got = queues.pop(b, s, left)
        n = before - int(queues.lengths[b, s])
        if n == 0:
            continue
        step.slots.append(s)
        step.items.append(got)
        step.rows.append(n)
        if left is not None:
            left -= n
    return step if step.slots else None


def next_expert_step(queues: MuQueues, scheduler, max_batch: int, group_block: bool,
                     gate: Optional[ExpertGate] = None, now: float = 0.0) -> Optional[ExpertStep]:
    """The scheduler's pick among the queues the gate lets run and, grouped, every other
    non-empty queue of its block (the pick first, so the batch limit never starves the
    scheduler's choice)."""
    gated = gate is not None and gate.enabled
    pick = scheduler.pick(gate.ready(queues.lengths, now) if gated else queues.lengths)
    if pick is None:
        return None
    b, slot = pick
    slots = [slot]
    if group_block:
        slots += [s for s in (queues.lengths[b] > 0).nonzero()[0].tolist() if s != slot]
    step = _pop(queues, b, slots, max_batch)
    if gated:
        gate.ran(b, int(queues.lengths[b].sum()))
    return step


def drain_block_step(queues: MuQueues, b: int) -> Optional[ExpertStep]:
    """Lockstep: every queue of block b, completely."""
    return _pop(queues, b, (queues.lengths[b] > 0).nonzero()[0].tolist(), None)
