"""Attention-rank poll loops: AEP (μ-queue per block, scheduler picks) and lockstep."""

from __future__ import annotations

import time

import torch

from amoe_serve.counters import RankCounters
from amoe_serve.engine.attention_core import AttentionCore, Segment
from amoe_serve.engine.headers import CancelHeader, RequestHeader
from amoe_serve.token_events import TokenEvent
from amoe_serve.engine.tags import GATEWAY_RANK, Tag
from amoe_serve.engine.topology import Topology
from amoe_serve.sampler import SamplingParams
from amoe_serve.sched.attention_plan import AttentionPlan
from amoe_serve.procs import memory_mb
from amoe_transport import Message, Transport


class AttentionRank:
    def __init__(self, core: AttentionCore, transport: Transport, topo: Topology, scheduler,
                 max_batch_tokens: int, max_poll_sleep: float, max_wait_s: float = 0.05, waves: int = 1,
                 min_wave_requests: int = 1):
        self.core = core
        self.t = transport
        self.topo = topo
        self.scheduler = scheduler
        self.max_batch_tokens = max_batch_tokens
        self.max_sleep = max_poll_sleep
        self.num_blocks = core.spec.num_blocks
        # Every scheduling decision (wave, queue, batch, wave gate, sampling) lives in the plan,
        # which the cluster simulator runs too.
        self.plan = AttentionPlan(self.num_blocks, waves, max_batch_tokens, max_wait_s, scheduler,
                                  min_wave_requests)
        self.queues = self.plan.queues
        self.counters = RankCounters(self.num_blocks, waves)
        self.stop = False
        self._cpu0: float | None = None  # process CPU time when the loop started
        self._sync: dict[int, list[Message]] = {}    # lockstep round -> peers' STEP_SYNC
        self._combine: list[Message] = []            # lockstep replies of the current block

    # ---- messages --------------------------------------------------------------------------
    def handle(self, m: Message) -> None:
        if m.tag == Tag.COMBINE and "step" not in m.header:
            b = m.header["b"]
            done = self.core.deliver(b, m.tensors[0], m.tensors[1], m.header.get("segs"))
            self.plan.returned(b, [(s, s.wave, s.num_tokens) for s in done], time.perf_counter())
        elif m.tag == Tag.COMBINE:
            self._combine.append(m)
        elif m.tag == Tag.REQUEST:
            self._admit(RequestHeader.decode(m.header))
        elif m.tag == Tag.CANCEL:
            self.core.cancel(CancelHeader.decode(m.header).id)
        elif m.tag == Tag.STEP_SYNC:
            self._sync.setdefault(m.header["round"], []).append(m)
        elif m.tag == Tag.SHUTDOWN:
            self.stop = True
        elif m.tag == Tag.STATS_REQUEST:
            self.t.isend(GATEWAY_RANK, Tag.STATS, self.stats())
        else:
            raise RuntimeError(f"attention rank got unexpected message tag {m.tag} from rank {m.src}")

    def stats(self) -> dict:
        return {"rank": self.t.rank, "role": "attention", **self.counters.to_dict(), "link": self.t.link_stats.to_dict(),
                "queue_now": self.queues.lengths.tolist(), "running": len(self.core.requests),
                "kv_free_blocks": self.core.allocator.num_free, "memory": memory_mb(),
                "cpu_s": None if self._cpu0 is None else time.process_time() - self._cpu0}

    def _admit(self, h: RequestHeader) -> None:
        try:
            params = SamplingParams.from_dict(h.params)
            wave = self.plan.wave_for([r.wave for r in self.core.requests.values()])
            seg = self.core.admit(h.id, h.prompt_token_ids, params, wave)
        except (ValueError, RuntimeError) as e:
            self._emit([TokenEvent(h.id, None, "error", str(e))])
            return
        self._push(0, seg)

    def _push(self, b: int, seg: Segment) -> None:
        self.plan.push(b, seg.wave, seg, seg.num_tokens, time.perf_counter())

    def _sample(self) -> None:
        segs = self.plan.sample_batch(time.perf_counter())  # one LM-head call per ready wave
        if not segs:
            return
        events, new = self.core.sample(segs)
        for s in new:
            self._push(0, s)
        self._emit(events)

    def _emit(self, events: list[TokenEvent]) -> None:
        if events:
            self.t.isend(GATEWAY_RANK, Tag.TOKENS, {"events": [e.to_wire() for e in events]})

    def _drain(self, timeout: float) -> bool:
        msgs = self.t.wait(timeout, self.max_sleep) if timeout > 0 else self.t.poll()
        for m in msgs:
            self.handle(m)
        return bool(msgs)

    # ---- AEP ---------------------------------------------------------------------------------
    def run_aep(self) -> None:
        self._cpu0 = time.process_time()
        polled = False  # the last idle wait already took in everything that had arrived
        while not self.stop:
            self.counters.sample_queue_depths(self.queues.lengths, time.perf_counter())
            if not polled:
                self._drain(0)
            self._sample()
            now = time.perf_counter()
            batch = self.plan.next_batch(now)
            if batch is None:
                # Nothing runs until a message arrives (it wakes the wait) or a held queue's
                # max_wait runs out: sleep until then, not in max_sleep slices that each re-poll
                # and re-decide for nothing.
                wake = self.plan.next_wake(now)
                wait = self.max_sleep * 25 if wake is None else min(self.max_sleep * 25, max(wake - now, 2e-5))
                t0 = time.perf_counter()
                polled = self._drain(wait)
                self.counters.record_idle(time.perf_counter() - t0)
                continue
            polled = False
            t0 = time.perf_counter()
            b = batch.block
            self.t.alltoallv(Tag.DISPATCH, {self.topo.expert_rank(d.dst_index): (d.header, d.tensors)
                                            for d in self.core.attend(b, batch.items)})  # one merged segment
            self.counters.record_batch(b, batch.wave, batch.tokens)
            self.counters.record_busy(time.perf_counter() - t0)
        self.t.flush(timeout=10)

    # ---- lockstep ----------------------------------------------------------------------------
    def _agree(self, rnd: int) -> tuple[int, bool]:
        """All attention ranks exchange queued-token counts; returns (global tokens, stop)."""
        peers = [r for r in self.topo.attention if r != self.t.rank]
        # Decide only on what was exchanged: SHUTDOWN may arrive while we wait, and every
        # rank must reach the same decision in the same round.
        mine, stop = self.queues.total(), self.stop
        for p in peers:
            self.t.isend(p, Tag.STEP_SYNC, {"round": rnd, "tokens": mine, "stop": stop})
        while len(self._sync.get(rnd, [])) < len(peers):
            self._drain(self.max_sleep * 25)
        got = self._sync.pop(rnd, [])
        return mine + sum(m.header["tokens"] for m in got), stop or any(m.header["stop"] for m in got)

    def run_lockstep(self) -> None:
        self._cpu0 = time.process_time()
        self.plan.ungate()  # the barrier keeps the one wave whole
        step = rnd = 0
        D = self.core.spec.hidden_size
        while True:
            self._drain(0)
            total, stop = self._agree(rnd)
            rnd += 1
            if stop:
                break
            if total == 0:
                t0 = time.perf_counter()
                self._drain(self.max_sleep)
                self.counters.record_idle(time.perf_counter() - t0)
                continue
            t0 = time.perf_counter()
            segs = self.queues.pop(0, 0, self.max_batch_tokens) if self.queues.total() else []
            for b in range(self.num_blocks):
                if segs:
                    sends = [(self.topo.expert_rank(d.dst_index), d.header, d.tensors)
                             for d in self.core.attend(b, segs, all_ranks=True)]
                    self.counters.record_batch(b, 0, sum(s.num_tokens for s in segs))
                else:  # idle data-parallel rank still takes part in the exchange
                    dev = self.core.device
                    empty = [torch.zeros(0, 3, dtype=torch.int32, device=dev),
                             torch.zeros(0, D, dtype=self.core.model.dtype, device=dev)]
                    sends = [(r, {"b": b, "experts": [], "counts": []}, empty) for r in self.topo.experts]
                self.t.alltoallv(Tag.DISPATCH, {dst: ({**h, "step": step}, ts) for dst, h, ts in sends})
                while len(self._combine) < self.topo.expert_ranks:
                    self._drain(self.max_sleep)
                done: list[Segment] = []
                for m in self._combine:
                    assert m.header["step"] == step and m.header["b"] == b, m.header
                    done.extend(self.core.deliver(b, m.tensors[0], m.tensors[1], m.header.get("segs")))
                self._combine = []
                if segs and len(done) != 1:
                    raise RuntimeError(f"lockstep block {b}: the step's segment is missing expert outputs")
                segs = done
            self.plan.returned(self.num_blocks - 1, [(s, s.wave, s.num_tokens) for s in segs], 0.0)
            self._sample()
            step += 1
            self.counters.record_busy(time.perf_counter() - t0)
        self.t.flush(timeout=10)
