"""What an AEP expert rank decides, as pure logic: which block runs, which of its queues run
together (one grouped GEMM), and how many rows each gives under the step's row budget. The one
copy that `engine/expert_core.py` and the simulator (`sim/aep.py`) call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .queues import MuQueues


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


def next_expert_step(queues: MuQueues, scheduler, max_batch: int, group_block: bool) -> Optional[ExpertStep]:
    """The scheduler's pick and, grouped, every other non-empty queue of its block (the pick
    first, so the batch limit never starves the scheduler's choice)."""
    pick = scheduler.pick(queues.lengths)
    if pick is None:
        return None
    b, slot = pick
    slots = [slot]
    if group_block:
        slots += [s for s in (queues.lengths[b] > 0).nonzero()[0].tolist() if s != slot]
    return _pop(queues, b, slots, max_batch)


def drain_block_step(queues: MuQueues, b: int) -> Optional[ExpertStep]:
    """Lockstep: every queue of block b, completely."""
    return _pop(queues, b, (queues.lengths[b] > 0).nonzero()[0].tolist(), None)
