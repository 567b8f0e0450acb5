"""Expert-rank poll loops: AEP (scheduler picks a μ-queue whenever free) and lockstep."""

from __future__ import annotations

import time
from collections import Counter

import torch

from amoe_serve.engine.expert_core import ExpertCore
from amoe_serve.engine.tags import Tag
from amoe_serve.engine.topology import Topology
from amoe_serve.procs import memory_mb
from amoe_transport import Message, Transport


class ExpertRank:
    def __init__(self, core: ExpertCore, transport: Transport, topo: Topology, hidden: int,
                 dtype: torch.dtype, max_poll_sleep: float, device: str = "cpu"):
        self.device = device
        self.core = core
        self.t = transport
        self.topo = topo
        self.hidden = hidden
        self.dtype = dtype
        self.max_sleep = max_poll_sleep
        self.stop = False
        self._cpu0: float | None = None  # process CPU time when the loop started
        self._arrived: Counter = Counter()   # lockstep (step, block) -> messages received

    def handle(self, m: Message) -> None:
        if m.tag == Tag.DISPATCH:
            self.core.receive(m.src, m.header, m.tensors[0], m.tensors[1])
            if "step" in m.header:
                self._arrived[(m.header["step"], m.header["b"])] += 1
        elif m.tag == Tag.SHUTDOWN:
            self.stop = True
        elif m.tag == Tag.STATS_REQUEST:
            self.t.isend(0, Tag.STATS, self.stats())
        else:
            raise RuntimeError(f"expert rank got unexpected message tag {m.tag} from rank {m.src}")

    def stats(self) -> dict:
        return {"rank": self.t.rank, "role": "expert", **self.core.counters.to_dict(), "link": self.t.link_stats.to_dict(),
                "queue_now": self.core.queues.lengths.tolist(),
                "experts": [list(e) for e in self.core.expert_of], "memory": memory_mb(),
                "cpu_s": None if self._cpu0 is None else time.process_time() - self._cpu0}

    def _drain(self, timeout: float) -> None:
        for m in (self.t.wait(timeout, self.max_sleep) if timeout > 0 else self.t.poll()):
            self.handle(m)

    def run_aep(self) -> None:
        self._cpu0 = time.process_time()
        c = self.core.counters
        while not self.stop:
            c.sample_queue_depths(self.core.queues.lengths, time.perf_counter())
            self._drain(0)
            t0 = time.perf_counter()
            replies = self.core.step()
            if not replies:
                wait = self.max_sleep * 25
                if self.core.gate.enabled and self.core.pending():  # held rows: wake at their deadline
                    wait = max(0.0, min(wait, self.core.gate.next_deadline() - time.perf_counter()))
                self._drain(wait)
                c.record_idle(time.perf_counter() - t0)
                continue
            for r in replies:
                self.t.isend(r.dst, Tag.COMBINE, r.header, r.tensors)
            c.record_busy(time.perf_counter() - t0)
        self.t.flush(timeout=10)

    def run_lockstep(self) -> None:
        self._cpu0 = time.process_time()
        c = self.core.counters
        A = self.topo.attention_ranks
        while not self.stop:
            ready = [k for k, n in self._arrived.items() if n == A]
            if not ready:
                t0 = time.perf_counter()
                self._drain(self.max_sleep * 25)
                c.record_idle(time.perf_counter() - t0)
                continue
            t0 = time.perf_counter()
            for key in sorted(ready):
                del self._arrived[key]
                step, b = key
                replies = {r.dst: r for r in self.core.drain_block(b)}
                empty = [torch.zeros(0, 3, dtype=torch.int32, device=self.device),
                         torch.zeros(0, self.hidden, dtype=self.dtype, device=self.device)]
                self.t.alltoallv(Tag.COMBINE, {
                    dst: ({"b": b, "step": step}, replies[dst].tensors if dst in replies else empty)
                    for dst in self.topo.attention})
            c.record_busy(time.perf_counter() - t0)
        self.t.flush(timeout=10)
