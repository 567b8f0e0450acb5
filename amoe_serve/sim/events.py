"""The simulator's clock and shared resources: an event heap, per-sender serialized links, a
core limit for CPU machines, and the makespan of independent jobs."""
from __future__ import annotations

import heapq

from .cost import CostModel


class EventLoop:
    """A heap of (time, seq, callback, args); seq breaks ties in insertion order, so a seed fixes
    every result."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list = []
        self._seq = 0
        self.events = 0

    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._heap, (t, self._seq, fn, args))
        self._seq += 1

    def run(self, until: float | None = None) -> None:
        heap = self._heap
        while heap:
            if until is not None and heap[0][0] > until:
                self.now = until
                return
            t, _, fn, args = heapq.heappop(heap)
            self.now = t
            self.events += 1
            fn(*args)


class Net:
    """Messages from one GPU serialize on its link of each kind (intra / inter node)."""

    def __init__(self, cost: CostModel, node_of: list[int]) -> None:
        self.cost = cost
        self.node_of = node_of
        self.free: dict = {}
        self.bytes = 0.0
        self.messages = 0

    def send(self, now: float, src: int, dst: int, nbytes: float) -> float:
        """Arrival time of a message posted now."""
        self.messages += 1
        if src == dst:
            return now
        self.bytes += nbytes
        same = self.node_of[src] == self.node_of[dst]
        bw, lat = self.cost.link(same)
        key = (src, same)
        start = max(now, self.free.get(key, 0.0))
        done = start + nbytes / bw
        self.free[key] = done
        return done + lat


class Cores:
    """At most `n` ranks compute at once (n = 0: unlimited, one device per rank)."""

    def __init__(self, loop: EventLoop, n: int) -> None:
        self.loop, self.n, self.busy, self.wait = loop, n, 0, []

    def run(self, duration: float, fn, *args) -> None:
        if self.n <= 0:
            self.loop.at(self.loop.now + duration, fn, *args)
        elif self.busy < self.n:
            self.busy += 1
            self.loop.at(self.loop.now + duration, self._done, fn, args)
        else:
            self.wait.append((duration, fn, args))

    def _done(self, fn, args) -> None:
        self.busy -= 1
        if self.wait:
            d, f, a = self.wait.pop(0)
            self.busy += 1
            self.loop.at(self.loop.now + d, self._done, f, a)
        fn(*args)


def makespan(durations: list[float], cores: int) -> float:
    """Time for independent jobs on `cores` workers (0 = one each); longest first."""
    ds = [d for d in durations if d > 0]
    if not ds:
        return 0.0
    if cores <= 0 or cores >= len(ds):
        return max(ds)
    free = [0.0] * cores
    for d in sorted(ds, reverse=True):
        i = free.index(min(free))
        free[i] += d
    return max(free)


def node_layout(attention_gpus: int, expert_gpus: int, gpus_per_node: int) -> list[int]:
    """Node of each GPU (attention ranks first, then expert ranks), both kinds spread evenly."""
    import math
    G = attention_gpus + expert_gpus
    nodes = max(1, math.ceil(G / gpus_per_node))
    return ([i * nodes // attention_gpus for i in range(attention_gpus)]
            + [i * nodes // expert_gpus for i in range(expert_gpus)])
