"""Rank 0 of a serving data plane: the gateway loop that answers ingress replicas over the
link (`amoe_serve/link/server.py`) and drives attention ranks over the transport.

The link's messages, their shapes and directions: `amoe_serve/link/messages.py`. Request ids
are the client's; the gateway scopes them per connection (internal id "cid/id"), and a
connection that closes has all its requests cancelled (their KV freed). A frame that is no
valid message is answered (Rejected 400 for a Generate, else ErrorNotice); the connection stays.

Graceful shutdown: SIGTERM (to the gateway, or to mpiexec, which forwards it to every rank)
starts a drain: new requests are rejected with 503 ("draining"), pings answer unhealthy, and
in-flight requests get `serving.drain_grace_s` seconds to finish; what is left then is answered
with an error event and cancelled. Then the gateway shuts the ranks down and the job exits 0.

Failure detection: a rank that dies ends the MPI job (mpiexec kills the rest), the link closes
and the ingress fails in-flight requests at once. A rank that hangs (alive, but no longer
polling) is caught by heartbeats: the gateway asks every rank for its counters every
`runtime.heartbeat_timeout_s / 4` seconds, and a rank that has answered before but then stays
silent for `runtime.heartbeat_timeout_s` fails every in-flight request and aborts the job, so the
launcher restarts it.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

from amoe_serve.link import wire
from amoe_serve.config import AmoeConfig
from amoe_serve.engine.gateway import RankFailed
from amoe_serve.engine.job import make_gateway
from amoe_serve.link.api import ModelInfo
from amoe_serve.link.messages import (Cancel, ErrorNotice, Generate, GatewayState, MessageError, Ping, Pong,
                                      Rejected, ServingState, StatsQuery, StatsReply, Tokens)
from amoe_serve.link.server import LinkEvent, LinkServer
from amoe_serve.engine.tags import Tag
from amoe_serve.model import ModelSpec
from amoe_serve.requests_io import GenerateRequest
from amoe_serve.sampler import SamplingParams
from amoe_serve.token_events import TokenEvent
from amoe_transport import Transport
from amoe_serve.model import load_spec

STATS_INTERVAL_S = 0.5
STATS_WAIT_S = 1.0  # longest a stats reply waits for fresh counters from every rank
CANCEL_SETTLE_S = 5.0  # after the drain grace: most seconds to wait for cancelled requests to leave the ranks
DRAINING = "the data plane is shutting down (draining): not accepting new requests; retry later"


class ServingGateway:
    def __init__(self, cfg: AmoeConfig, transport: Transport, spec: ModelSpec):
        self.cfg = cfg
        self.spec = spec
        self.t = transport
        self.gw = make_gateway(cfg, transport, spec, on_event=self._on_event)
        self.max_sleep = cfg.runtime.gateway_poll_sleep_us * 1e-6
        lk = cfg.link
        info = ModelInfo(lk.model_name, self.gw.limits.max_model_len, spec.vocab_size, list(spec.eos_token_ids),
                         lk.max_queued_requests, (Path(cfg.model.path) / "tokenizer.json").is_file())
        self.server = LinkServer(lk.host, lk.port, lk.token or "", info, lk.max_frame_bytes, lk.auth_timeout_s)
        bell = transport.wakeup_fd()
        if bell is not None:  # tokens from the ranks wake the loop, not its next timed poll
            self.server.watch(bell, transport.clear_wakeups)
        self.owner: dict[str, tuple[int, str]] = {}        # internal id -> (connection, client id)
        self.by_conn: dict[int, set[str]] = defaultdict(set)
        self.out: dict[int, list[TokenEvent]] = defaultdict(list)  # events to send per connection
        self.stats_waiters: list[tuple[int, int]] = []     # (connection, seq)
        self._last_stats_req = 0.0
        self.stats_at: dict[int, float] = {}  # rank -> when its latest counters arrived
        self.stop = False
        self.drain_deadline: Optional[float] = None  # set by begin_drain()
        self.hb_timeout = cfg.runtime.heartbeat_timeout_s
        self.hb_interval = max(0.1, self.hb_timeout / 4)
        self._last_hb = 0.0
        # rank -> when we last heard from it; a rank joins once it answers (it may still be
        # loading its weights long after the gateway is up)
        self.last_heard: dict[int, float] = {}
        self.drain_grace = cfg.serving.drain_grace_s
        self._drain_announced = False

    # ---- graceful shutdown ---------------------------------------------------------------
    def begin_drain(self, grace: Optional[float] = None) -> None:
        """Stop admitting; in-flight requests get `grace` seconds (default serving.drain_grace_s).
        Safe to call from a signal handler (it only sets fields the loop reads)."""
        if self.drain_deadline is None:
            self.drain_grace = self.drain_grace if grace is None else grace
            self.drain_deadline = time.monotonic() + self.drain_grace

    @property
    def draining(self) -> bool:
        return self.drain_deadline is not None

    def _drain_step(self) -> None:
        """While draining: stop once nothing is in flight; past the grace, fail what is left."""
        if not self._drain_announced:  # printed here, not in the signal handler
            self._drain_announced = True
            print(f"[amoe-serve] gateway: draining ({len(self.owner)} request(s) in flight, "
                  f"grace {self.drain_grace:g} s)", file=sys.stderr, flush=True)
        if not self.owner and self.gw.idle:
            self.stop = True
            return
        now = time.monotonic()
        if now < self.drain_deadline:
            return
        if self.owner:
            n = len(self.owner)
            err = (f"cancelled: the data plane is shutting down and the drain grace period "
                   f"({self.drain_grace:g} s) expired")
            for rid, (cid, crid) in list(self.owner.items()):
                self.out[cid].append(TokenEvent(crid, None, "error", err))
                self.gw.cancel(rid)
            self.owner.clear()
            self.by_conn.clear()
            print(f"[amoe-serve] gateway: drain grace of {self.drain_grace:g} s expired; failed {n} "
                  f"request(s) still in flight", file=sys.stderr, flush=True)
        # Let the ranks settle the cancellations (no message left in flight) before SHUTDOWN.
        if now > self.drain_deadline + CANCEL_SETTLE_S:
            self.stop = True

    # ---- data plane -> clients -----------------------------------------------------------
    def _on_event(self, ev: TokenEvent) -> None:
        rid = ev.request_id
        if ev.finish_reason is not None:
            self.gw.drop_result(rid)
        owner = self.owner.get(rid)
        if owner is None:  # its connection is gone; the request is being cancelled
            return
        cid, crid = owner
        self.out[cid].append(ev.renamed(crid))
        if ev.finish_reason is not None:
            del self.owner[rid]
            self.by_conn[cid].discard(rid)

    # ---- clients -> data plane -----------------------------------------------------------
    def _reject(self, cid: int, crid: Optional[str], status: int, error: str,
                retry_after: Optional[float] = None) -> None:
        self.server.send(cid, Rejected(crid, status, error, retry_after))

    def _generate(self, cid: int, msg: Generate) -> None:
        crid = msg.id
        rid = f"{cid}/{crid}"
        if rid in self.owner:
            self._reject(cid, crid, 400, f"request id {crid!r} is already running on this connection")
            return
        ids = msg.prompt_token_ids
        V = self.spec.vocab_size
        if not all(0 <= t < V for t in ids):
            self._reject(cid, crid, 400, f"'prompt_token_ids' must be a non-empty list of token ids in [0, {V})")
            return
        try:
            params = SamplingParams.from_dict(msg.params)
            params.check_vocab(V)
        except (ValueError, TypeError) as e:
            self._reject(cid, crid, 400, str(e))
            return
        req = GenerateRequest(rid, ids, params)
        err = self.gw.limits.check(req)
        if err is not None:
            self._reject(cid, crid, 400, err)
            return
        if self.draining:
            self._reject(cid, crid, 503, DRAINING, retry_after=1.0)
            return
        if self.gw.waiting_count >= self.cfg.link.max_queued_requests:
            self._reject(cid, crid, 429, "the data plane is at capacity; retry later", retry_after=1.0)
            return
        self.owner[rid] = (cid, crid)
        self.by_conn[cid].add(rid)
        self.gw.submit(req)

    def _cancel(self, rid: str) -> None:
        if rid in self.owner:
            self.gw.cancel(rid)
            if not self.gw.is_running(rid):  # was still waiting: nothing runs, finish it now
                self._on_event(TokenEvent(rid, None, "abort"))

    def _link(self, ev: LinkEvent) -> None:
        msg = ev.msg
        if isinstance(msg, Generate):
            self._generate(ev.cid, msg)
        elif isinstance(msg, Cancel):
            self._cancel(f"{ev.cid}/{msg.id}")
        elif isinstance(msg, StatsQuery):
            self.stats_waiters.append((ev.cid, msg.seq))
            self._request_stats(force=True)
        elif isinstance(msg, Ping):
            self.server.send(ev.cid, Pong(msg.seq, healthy=not self.draining, draining=self.draining))
        elif ev.bad is not None:
            self._bad(ev.cid, ev.bad)
        else:  # connection lost: cancel everything it had in flight
            for rid in list(self.by_conn.pop(ev.cid, ())):
                self._cancel(rid)
                self.owner.pop(rid, None)
            self.out.pop(ev.cid, None)

    def _bad(self, cid: int, e: MessageError) -> None:
        """A frame that is no valid message: a Generate is refused by its id, the rest answered."""
        if e.kind == Generate.TYPE:
            self._reject(cid, e.request_id, 400, e.detail)
        else:
            self.server.send(cid, ErrorNotice(str(e)))

    # ---- stats ---------------------------------------------------------------------------
    def _request_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_stats_req > STATS_INTERVAL_S:
            self._last_stats_req = now
            for r in range(1, self.gw.topo.world_size):
                self.t.isend(r, Tag.STATS_REQUEST, {})

    def _answer_stats(self) -> None:
        if not self.stats_waiters:
            return
        # Answer with counters sent after the request (earlier ones, e.g. from heartbeats, are
        # stale); a rank that is slow to answer holds the reply back for at most a second.
        fresh = all(self.stats_at.get(r, -1.0) >= self._last_stats_req for r in range(1, self.gw.topo.world_size))
        if not fresh and time.monotonic() - self._last_stats_req < STATS_WAIT_S:
            return
        ranks = {str(k): v for k, v in sorted(self.gw.stats.items())}
        gateway = GatewayState(self.gw.waiting_count, self.gw.running_count,
                               {str(r): n for r, n in self.gw.kv_free_blocks().items()})
        serving = ServingState(self.gw.limits.blocks_per_rank, self.server.connection_count, self.draining)
        for cid, seq in self.stats_waiters:
            self.server.send(cid, StatsReply(seq, ranks, gateway, serving))
        self.stats_waiters.clear()

    # ---- loop ----------------------------------------------------------------------------
    def run(self) -> None:
        sleep = 0.0
        while not self.stop:
            events = self.server.poll(sleep)
            msgs = self.t.poll()
            now = time.monotonic()
            for m in msgs:
                self.last_heard[m.src] = now
                if m.tag == Tag.STATS:
                    self.stats_at[m.src] = now
                self.gw.handle(m)
            if self.hb_timeout > 0:
                self._heartbeat(now)
            for ev in events:
                self._link(ev)
            if self.draining:
                self._drain_step()
            for cid, evs in self.out.items():
                if evs:
                    self._send_events(cid, evs)
            self.out.clear()
            self._answer_stats()
            sleep = 0.0 if (events or msgs) else min(self.max_sleep, max(2e-5, sleep * 2))

    def _send_events(self, cid: int, evs: list[TokenEvent]) -> None:
        frames, too_big = frame_events(evs, wire.MAX_FRAME_BYTES)
        for crid in too_big:  # failed in its frame; its request must stop and leave the tables
            rid = next((r for r, (c, cr) in self.owner.items() if c == cid and cr == crid), None)
            if rid is not None:
                self.gw.cancel(rid)
                del self.owner[rid]
                self.by_conn[cid].discard(rid)
        for frame in frames:
            self.server.send(cid, frame)

    def _heartbeat(self, now: float) -> None:
        if now - self._last_hb >= self.hb_interval:
            self._last_hb = now
            for r in range(1, self.gw.topo.world_size):
                self.t.isend(r, Tag.STATS_REQUEST, {})
        for r, t in self.last_heard.items():
            if now - t > self.hb_timeout:
                raise RankFailed(f"rank {r} ({self.gw.topo.role(r)}) has not answered for {now - t:.0f} s "
                                 f"(runtime.heartbeat_timeout_s={self.hb_timeout:g}): presumed hung; "
                                 f"restarting the data plane")

    def fail_all(self, error: str) -> None:
        for rid, (cid, crid) in list(self.owner.items()):
            self.server.send(cid, Tokens((TokenEvent(crid, None, "error", error),)))


def _plain_size(ev: TokenEvent) -> int:
    """Bound on the JSON size of an event without logprobs (ids and errors may be all escapes)."""
    return 6 * (len(ev.request_id) + len(ev.error or "")) + 64


def frame_events(evs: list[TokenEvent], frame_bytes: int) -> tuple[list[Tokens], list[str]]:
    """Token events in as few Tokens frames as fit. An event that alone exceeds a frame (a huge
    prompt_logprobs answer) becomes an error event for its own request (returned ids), so one
    request cannot break the link for the others."""
    budget = frame_bytes - 64
    frames: list[Tokens] = []
    frame: list[TokenEvent] = []
    size = 0
    too_big = []
    for ev in evs:
        # Only events with logprobs can be large: the rest are sized without encoding them.
        has_lps = ev.logprobs is not None or ev.prompt_logprobs is not None
        n = 1 + (len(json.dumps(ev.to_wire(), separators=(",", ":"))) if has_lps else _plain_size(ev))
        if n > budget:
            too_big.append(ev.request_id)
            ev = TokenEvent(ev.request_id, None, "error", f"the answer with its logprobs ({n} bytes) exceeds the "
                                                          f"link frame limit of {frame_bytes} bytes: ask for fewer logprobs")
            n = _plain_size(ev)
        if frame and size + n > budget:
            frames.append(Tokens(tuple(frame)))
            frame, size = [], 0
        frame.append(ev)
        size += n
    if frame:
        frames.append(Tokens(tuple(frame)))
    return frames, too_big


def gateway_serve(cfg: AmoeConfig, transport: Transport, address_file: Optional[str]) -> None:
    import signal

    g = ServingGateway(cfg, transport, load_spec(cfg.model.path))

    signal.signal(signal.SIGTERM, lambda signum, frame: g.begin_drain())
    host, port = g.server.address
    if address_file:
        tmp = Path(address_file + ".tmp")
        tmp.write_text(f"{host}:{port}\n")
        tmp.replace(address_file)
    print(f"[amoe-serve] gateway for model {cfg.link.model_name!r} listening on {host}:{port}",
          file=sys.stderr, flush=True)
    try:
        g.run()
        g.server.flush(timeout=2.0)  # final tokens and errors reach the ingress
        g.gw.shutdown(timeout=10.0)  # SHUTDOWN to every rank; they exit, and so does the job
        print("[amoe-serve] gateway: drained; data plane stopped", file=sys.stderr, flush=True)
    except RankFailed as e:
        g.fail_all(str(e))
        raise
    finally:
        g.server.close()
