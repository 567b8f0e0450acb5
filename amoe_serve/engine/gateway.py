"""Gateway (rank 0): owns request state for the data plane, places requests on attention
ranks, collects sampled tokens, frees state on finish or cancel."""

from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

from amoe_serve.engine.admission import Admission, Limits
from amoe_serve.engine.headers import CancelHeader, FatalHeader, RequestHeader
from amoe_serve.engine.tags import Tag
from amoe_serve.engine.topology import Topology
from amoe_serve.requests_io import GenerateRequest, GenerateResult
from amoe_serve.token_events import TokenEvent
from amoe_transport import Message, Transport
from amoe_serve.errors import AmoeError


class RankFailed(AmoeError, RuntimeError):
    """A data-plane rank reported an error or stopped answering."""


class Gateway:
    def __init__(self, transport: Transport, topo: Topology, limits: Limits,
                 max_poll_sleep: float = 0.002,
                 on_event: Optional[Callable[[TokenEvent], None]] = None):
        self.t = transport
        self.topo = topo
        self.limits = limits
        self.adm = Admission(topo.attention, limits)
        self.max_sleep = max_poll_sleep
        self.on_event = on_event
        self.results: dict[str, GenerateResult] = {}
        self.stats: dict[int, dict] = {}

    def submit(self, req: GenerateRequest) -> None:
        res = self.results[req.id] = GenerateResult(req.id)
        err = self.limits.check(req)
        if err is not None:
            res.error, res.finish_reason = err, "error"
            return
        self.adm.enqueue(req)
        self._place()

    def cancel(self, rid: str) -> None:
        if self.adm.drop_waiting(rid):
            self.results[rid].finish_reason = "abort"
        elif rid in self.adm.placed:
            self.t.isend(self.adm.placed[rid][0], Tag.CANCEL, CancelHeader(rid).encode())

    # ---- queries: what the serving gateway reads, instead of the admission tables ----------
    @property
    def waiting_count(self) -> int:
        """Requests admitted but not yet placed on an attention rank."""
        return len(self.adm.waiting)

    @property
    def running_count(self) -> int:
        """Requests placed on an attention rank (their KV reserved)."""
        return len(self.adm.placed)

    def is_running(self, rid: str) -> bool:
        return rid in self.adm.placed

    def kv_free_blocks(self) -> dict[int, int]:
        """Attention rank -> KV blocks not reserved by a running request."""
        return dict(self.adm.free)

    @property
    def idle(self) -> bool:
        return self.adm.idle

    def drop_result(self, rid: str) -> None:
        """Forget a request's result: a streaming caller has sent its events on already."""
        self.results.pop(rid, None)

    def _place(self) -> None:
        for req, rank in self.adm.next_placements():
            self.t.isend(rank, Tag.REQUEST, RequestHeader(req.id, req.prompt_token_ids, req.params.to_dict()).encode())

    def handle(self, m: Message) -> None:
        if m.tag == Tag.TOKENS:
            for w in m.header["events"]:
                ev = TokenEvent.from_wire(w)
                self.results[ev.request_id].record(ev)
                if ev.finish_reason is not None:
                    self.adm.release(ev.request_id)
                if self.on_event is not None:
                    self.on_event(ev)
            self._place()
        elif m.tag == Tag.STATS:
            self.stats[m.src] = m.header
        elif m.tag == Tag.FATAL:
            raise RankFailed(FatalHeader.decode(m.header).describe())
        else:
            raise RuntimeError(f"gateway got unexpected message tag {m.tag} from rank {m.src}")

    def pump(self, timeout: float) -> None:
        for m in self.t.wait(timeout, self.max_sleep):
            self.handle(m)

    def run(self, requests: Iterable[GenerateRequest], timeout: float | None = None) -> None:
        for r in requests:
            self.submit(r)
        deadline = None if not timeout else time.monotonic() + timeout
        while not self.idle:
            if deadline is not None and time.monotonic() > deadline:
                raise RankFailed(f"requests did not finish within {timeout:.0f} s")
            self.pump(0.05)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Tell every rank to stop and collect their counters."""
        others = [r for r in range(1, self.topo.world_size)]
        for r in others:
            self.t.isend(r, Tag.SHUTDOWN, {})
        deadline = time.monotonic() + timeout
        while len(self.stats) < len(others) and time.monotonic() < deadline:
            self.pump(0.05)
        self.t.flush(timeout=timeout)
