"""Rank 0 of a serving data plane: the gateway loop that answers ingress replicas over the
link (`link_server.py`) and drives attention ranks over the transport.

Link messages (JSON frames), client -> gateway:
  {"type": "generate", "id", "prompt_token_ids", "params"}   params = SamplingParams fields
  {"type": "cancel", "id"}
  {"type": "stats", "seq"}      -> {"type": "stats", "seq", "data": {"ranks": {...}, "gateway": {...}}}
  {"type": "ping", "seq"}       -> {"type": "pong", "seq", "healthy": true}
gateway -> client:
  {"type": "tokens", "events": [[id, token, finish_reason, error], ...]}
  {"type": "rejected", "id", "status": 400 | 429, "error", "retry_after"?}
Request ids are the client's; the gateway namespaces them per connection, and a connection
that closes has all its requests cancelled (their KV freed).
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

from amoe_serve.config import AmoeConfig
from amoe_serve.engine.gateway import RankFailed
from amoe_serve.engine.job import make_gateway
from amoe_serve.engine.link_server import LinkEvent, LinkServer
from amoe_serve.engine.protocol import Tag
from amoe_serve.model import ModelSpec
from amoe_serve.requests_io import GenerateRequest
from amoe_serve.sampler import SamplingParams
from amoe_transport import Transport

STATS_INTERVAL_S = 0.5


class ServingGateway:
    def __init__(self, cfg: AmoeConfig, transport: Transport, spec: ModelSpec):
        self.cfg = cfg
        self.spec = spec
        self.t = transport
        self.gw = make_gateway(cfg, transport, spec, on_event=self._on_event)
        self.max_sleep = cfg.runtime.max_poll_sleep_us * 1e-6
        lk = cfg.link
        info = {"name": lk.model_name, "max_model_len": self.gw.limits.max_model_len,
                "vocab_size": spec.vocab_size, "eos_token_ids": list(spec.eos_token_ids),
                "max_queued_requests": lk.max_queued_requests}
        self.server = LinkServer(lk.host, lk.port, lk.token or "", {"info": info},
                                 lk.max_frame_bytes, lk.auth_timeout_s)
        self.owner: dict[str, tuple[int, str]] = {}        # internal id -> (connection, client id)
        self.by_conn: dict[int, set[str]] = defaultdict(set)
        self.out: dict[int, list] = defaultdict(list)       # events to send per connection
        self.stats_waiters: list[tuple[int, object]] = []
        self._last_stats_req = 0.0
        self.stop = False

    # ---- data plane -> clients -----------------------------------------------------------
    def _on_event(self, rid: str, tok: Optional[int], reason: Optional[str], err: Optional[str]) -> None:
        if reason is not None:
            self.gw.results.pop(rid, None)
        owner = self.owner.get(rid)
        if owner is None:  # its connection is gone; the request is being cancelled
            return
        cid, crid = owner
        self.out[cid].append([crid, tok, reason, err])
        if reason is not None:
            del self.owner[rid]
            self.by_conn[cid].discard(rid)

    # ---- clients -> data plane -----------------------------------------------------------
    def _reject(self, cid: int, crid, status: int, error: str, retry_after: Optional[float] = None) -> None:
        msg = {"type": "rejected", "id": crid, "status": status, "error": error}
        if retry_after is not None:
            msg["retry_after"] = retry_after
        self.server.send(cid, msg)

    def _generate(self, cid: int, msg: dict) -> None:
        crid = msg.get("id")
        if not isinstance(crid, str) or not crid or len(crid) > 256:
            self._reject(cid, crid, 400, "'id' must be a non-empty string of at most 256 characters")
            return
        rid = f"{cid}/{crid}"
        if rid in self.owner:
            self._reject(cid, crid, 400, f"request id {crid!r} is already running on this connection")
            return
        ids = msg.get("prompt_token_ids")
        V = self.spec.vocab_size
        if (not isinstance(ids, list) or not ids
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V for t in ids)):
            self._reject(cid, crid, 400, f"'prompt_token_ids' must be a non-empty list of token ids in [0, {V})")
            return
        try:
            params = SamplingParams.from_dict(msg.get("params") or {})
            params.validate()
        except (ValueError, TypeError) as e:
            self._reject(cid, crid, 400, str(e))
            return
        req = GenerateRequest(rid, ids, params)
        err = self.gw.limits.check(req)
        if err is not None:
            self._reject(cid, crid, 400, err)
            return
        if len(self.gw.adm.waiting) >= self.cfg.link.max_queued_requests:
            self._reject(cid, crid, 429, "the data plane is at capacity; retry later", retry_after=1.0)
            return
        self.owner[rid] = (cid, crid)
        self.by_conn[cid].add(rid)
        self.gw.submit(req)

    def _cancel(self, rid: str) -> None:
        if rid in self.owner:
            self.gw.cancel(rid)
            if rid not in self.gw.adm.placed:  # was still waiting: nothing runs, finish it now
                self._on_event(rid, None, "abort", None)

    def _link(self, ev: LinkEvent) -> None:
        if ev.msg is None:  # connection lost: cancel everything it had in flight
            for rid in list(self.by_conn.pop(ev.cid, ())):
                self._cancel(rid)
                self.owner.pop(rid, None)
            self.out.pop(ev.cid, None)
            return
        kind = ev.msg["type"]
        if kind == "generate":
            self._generate(ev.cid, ev.msg)
        elif kind == "cancel":
            self._cancel(f"{ev.cid}/{ev.msg.get('id')}")
        elif kind == "stats":
            self.stats_waiters.append((ev.cid, ev.msg.get("seq")))
            self._request_stats(force=True)
        elif kind == "ping":
            self.server.send(ev.cid, {"type": "pong", "seq": ev.msg.get("seq"), "healthy": True})
        else:
            self.server.send(ev.cid, {"type": "error", "error": f"unknown message type {kind!r}"})

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
        if time.monotonic() - self._last_stats_req < 0.2 and len(self.gw.stats) < self.gw.topo.world_size - 1:
            return  # give the ranks a moment to answer
        adm = self.gw.adm
        data = {"ranks": {str(k): v for k, v in sorted(self.gw.stats.items())},
                "gateway": {"waiting": len(adm.waiting), "running": len(adm.placed),
                            "kv_free_blocks": {str(r): n for r, n in adm.free.items()}}}
        for cid, seq in self.stats_waiters:
            self.server.send(cid, {"type": "stats", "seq": seq, "data": data})
        self.stats_waiters.clear()

    # ---- loop ----------------------------------------------------------------------------
    def run(self) -> None:
        sleep = 0.0
        while not self.stop:
            events = self.server.poll(sleep)
            msgs = self.t.poll()
            for m in msgs:
                self.gw.handle(m)
            for ev in events:
                self._link(ev)
            for cid, evs in self.out.items():
                if evs:
                    self.server.send(cid, {"type": "tokens", "events": evs})
            self.out.clear()
            self._answer_stats()
            sleep = 0.0 if (events or msgs) else min(self.max_sleep, max(2e-5, sleep * 2))

    def fail_all(self, error: str) -> None:
        for rid, (cid, crid) in list(self.owner.items()):
            self.server.send(cid, {"type": "tokens", "events": [[crid, None, "error", error]]})


def gateway_serve(cfg: AmoeConfig, transport: Transport, address_file: Optional[str]) -> None:
    from amoe_serve.model import load_spec
    g = ServingGateway(cfg, transport, load_spec(cfg.model.path))
    host, port = g.server.address
    if address_file:
        tmp = Path(address_file + ".tmp")
        tmp.write_text(f"{host}:{port}\n")
        tmp.replace(address_file)
    print(f"[amoe-serve] gateway for model {cfg.link.model_name!r} listening on {host}:{port}",
          file=sys.stderr, flush=True)
    try:
        g.run()
    except RankFailed as e:
        g.fail_all(str(e))
        raise
    finally:
        g.server.close()
