"""Expert-rank state machine: one μ-queue per (block, local expert), scheduled grouped execution.

No communication here either: `receive` enqueues a dispatch message, `step` runs what the
scheduler picks and returns the replies, one per source attention rank.

Legend: R rows, D hidden, G experts in a grouped step.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Optional

import torch

from amoe_serve.counters import RankCounters
from amoe_serve.model import ExpertSide
from amoe_serve.sched.expert_plan import ExpertGate, ExpertStep, drain_block_step, next_expert_step
from amoe_serve.sched.queues import MuQueues


class BufferedRankCounters(RankCounters):
    """RankCounters plus the expert buffer's hits/misses/loads, so they travel with the rank's
    stats to the gateway (and into `generate --stats`, bench results)."""

    def __init__(self, num_blocks: int, num_slots: int, store) -> None:
        super().__init__(num_blocks, num_slots)
        self.store = store

    def to_dict(self) -> dict:
        return {**super().to_dict(), "expert_buffer": self.store.stats()}


class Chunk:
    """Rows start..stop of one dispatch message (its meta_R3 and y_RD), all for one expert. The
    views are cut only when asked for: a step that runs consecutive chunks of one message takes
    one view of it (_joined), so the usual step slices nothing per expert."""

    __slots__ = ("src", "msg", "start", "stop", "seg")

    def __init__(self, src: int, msg: tuple[torch.Tensor, torch.Tensor], start: int, stop: int, seg: int = -1):
        self.src = src      # attention rank the rows came from (world rank)
        self.msg = msg      # (meta_R3, y_RD) of the whole message
        self.start, self.stop = start, stop
        self.seg = seg      # the segment the rows belong to (the dispatch header's "seg"; -1: unknown)

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def meta_R3(self) -> torch.Tensor:
        return self.msg[0][self.start:self.stop]

    @property
    def y_RD(self) -> torch.Tensor:
        return self.msg[1][self.start:self.stop]


def _joined(chunks: list[Chunk]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(meta_R3, y_RD) of chunks that are consecutive rows of one message, as views; else None."""
    first = chunks[0]
    end = first.start
    for c in chunks:
        if c.msg is not first.msg or c.start != end:
            return None
        end = c.stop
    meta_R3, y_RD = first.msg
    if first.start == 0 and end == y_RD.shape[0]:
        return meta_R3, y_RD
    return meta_R3[first.start:end], y_RD[first.start:end]


@dataclass
class Reply:
    dst: int
    header: dict
    tensors: list[torch.Tensor]


class ExpertCore:
    def __init__(self, experts: ExpertSide, pairs: list[tuple[int, int]], num_blocks: int,
                 scheduler, max_batch: int, group_block: bool, counters: Optional[RankCounters] = None,
                 gate: Optional[ExpertGate] = None):
        self.experts = experts
        self.scheduler = scheduler
        self.max_batch = max_batch
        self.group_block = group_block
        # Local slot s of block b <-> global expert id.
        self.slot_of: dict[tuple[int, int], int] = {}
        self.expert_of: list[list[int]] = [[] for _ in range(num_blocks)]
        for b, e in pairs:
            self.slot_of[(b, e)] = len(self.expert_of[b])
            self.expert_of[b].append(e)
        num_slots = max(1, max(len(x) for x in self.expert_of))
        self.queues = MuQueues(num_blocks, num_slots)
        # A buffered store (expert_buffer.py) takes the next queued experts as prefetch hints.
        self.hints = bool(getattr(experts, "wants_upcoming", False))
        self.num_blocks = num_blocks
        self.gate = gate or ExpertGate(num_blocks)  # off unless configured
        self._last_run: dict[int, list[int]] = {}   # block -> experts its last step ran
        if counters is None:
            counters = (BufferedRankCounters(num_blocks, num_slots, experts) if hasattr(experts, "stats")
                        else RankCounters(num_blocks, num_slots))
        self.counters = counters

    def receive(self, src: int, header: dict, meta_R3: torch.Tensor, y_RD: torch.Tensor) -> None:
        b = int(header["b"])
        seg = int(header.get("seg", -1))
        experts, counts = header["experts"], header["counts"]
        if sum(counts) != y_RD.shape[0] or meta_R3.shape[0] != y_RD.shape[0] or len(experts) != len(counts):
            raise RuntimeError(f"dispatch counts sum to {sum(counts)} but {y_RD.shape[0]} rows arrived")
        try:
            slots = [self.slot_of[(b, e)] for e in experts]
        except KeyError as exc:
            raise RuntimeError(f"received tokens for block {b} expert {exc.args[0][1]}, which this rank does "
                               "not hold") from None
        msg = (meta_R3, y_RD)
        starts = list(itertools.accumulate(counts, initial=0))
        self.queues.push_many(b, slots, [Chunk(src, msg, s0, s1, seg) for s0, s1 in zip(starts, starts[1:])], counts)
        if self.gate.enabled:
            self.gate.pushed(b, time.perf_counter())

    def pending(self) -> int:
        return self.queues.total()

    def step(self) -> list[Reply]:
        """Run the queue(s) the scheduler picks; [] when every queue is empty."""
        now = time.perf_counter() if self.gate.enabled else 0.0
        return self._run(next_expert_step(self.queues, self.scheduler, self.max_batch, self.group_block,
                                          self.gate, now))

    def drain_block(self, b: int) -> list[Reply]:
        """Lockstep: run every queue of block b completely."""
        return self._run(drain_block_step(self.queues, b))

    def _upcoming(self, b: int, limit: int = 8) -> list[tuple[int, int]]:
        """Prefetch hints, so weights load while this step computes (and while the attention
        ranks work on the next block): the queues still holding rows, longest first (what the
        scheduler is likely to pick next), then the experts block b+1 ran last time (tokens
        for it come next; routing skew makes them likely again)."""
        L = self.queues.lengths
        bs, ss = L.nonzero()
        order = sorted(zip(bs.tolist(), ss.tolist()), key=lambda q: -int(L[q]))[:limit]
        keys = [(bb, self.expert_of[bb][s]) for bb, s in order]
        nb = (b + 1) % self.num_blocks
        keys += [(nb, e) for e in self._last_run.get(nb, []) if (nb, e) not in keys]
        return keys[:limit]

    def _run(self, step: Optional[ExpertStep]) -> list[Reply]:
        if step is None:
            return []
        b = step.block
        self.counters.record_batches(b, step.slots, step.rows)
        # Groups in expert order, so the grouped GEMM indexes the weight stacks directly.
        groups = sorted(zip(step.slots, step.items, step.rows), key=lambda g: self.expert_of[b][g[0]])
        chunks: list[Chunk] = [c for _, got, _ in groups for c in got]
        experts = [self.expert_of[b][s] for s, _, _ in groups]
        counts = [n for _, _, n in groups]
        joined = _joined(chunks)
        y_RD = joined[1] if joined is not None else torch.cat([c.y_RD for c in chunks])
        if self.hints:
            out_RD = self.experts.run_grouped(b, experts, counts, y_RD, upcoming=self._upcoming(b))
            self._last_run[b] = experts
        else:
            out_RD = self.experts.run_grouped(b, experts, counts, y_RD)
        srcs = {c.src for c in chunks}
        if len(srcs) == 1:  # one attention rank: the rows go back as they are
            meta_R3 = joined[0] if joined is not None else torch.cat([c.meta_R3 for c in chunks])
            return [Reply(chunks[0].src, _reply_header(b, chunks), [meta_R3, out_RD])]
        # Replies grouped by source attention rank.
        by_src: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        start = 0
        for c in chunks:
            n = c.rows
            metas, outs = by_src.setdefault(c.src, ([], []))
            metas.append(c.meta_R3)
            outs.append(out_RD[start:start + n])
            start += n
        return [Reply(src, _reply_header(b, [c for c in chunks if c.src == src]), [torch.cat(m), torch.cat(o)])
                for src, (m, o) in by_src.items()]


def _reply_header(b: int, chunks: list[Chunk]) -> dict:
    """{"b", "segs"}: the segments whose rows the reply carries, so the attention rank can
    file them without scanning the rows (omitted when a chunk's segment is unknown)."""
    segs = sorted({c.seg for c in chunks})
    return {"b": b, "segs": segs} if segs[0] >= 0 else {"b": b}
