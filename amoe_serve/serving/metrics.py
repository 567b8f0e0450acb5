"""Prometheus metrics of the ingress, on a per-app `CollectorRegistry` (never the global one).

Request-side: counts by endpoint/model/status, end-to-end latency, time to first token,
inter-token latency, prompt and generated token counters (tokens/s = rate of the counter),
requests in flight. Data-plane side: gauges refreshed from `await link.stats()` on every
scrape of /metrics (μ-queue depths and tokens per (rank, block, slot), executed batch sizes,
idle fraction per rank, gateway waiting/running/KV free blocks). Missing keys are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def _num(x: Any) -> float | None:
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float)) and math.isfinite(float(x)):
        return float(x)
    return None


def _grid(v: Any) -> Iterable[tuple[int, int, float]]:
    """(block, slot, value) of a [[...], ...] grid; anything malformed is skipped."""
    if not isinstance(v, (list, tuple)):
        return
    for b, row in enumerate(v):
        if isinstance(row, (list, tuple)):
            for s, x in enumerate(row):
                n = _num(x)
                if n is not None:
                    yield b, s, n
        else:
            n = _num(row)
            if n is not None:
                yield b, 0, n


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("amoe_http_requests", "HTTP requests by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=r)
        self.latency = Histogram("amoe_request_latency_seconds", "End-to-end latency of generation requests",
                                 ["endpoint", "model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("amoe_time_to_first_token_seconds", "Time from request arrival to the first token",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("amoe_inter_token_latency_seconds", "Time between consecutive tokens of a request",
                             ["model"], buckets=_TOKEN_BUCKETS, registry=r)
        self.generated_tokens = Counter("amoe_generated_tokens", "Generated tokens (rate = tokens/s)",
                                        ["model"], registry=r)
        self.prompt_tokens = Counter("amoe_prompt_tokens", "Prompt tokens of admitted requests", ["model"], registry=r)
        self.in_flight = Gauge("amoe_requests_in_flight", "Generation requests in flight on this replica",
                               ["model"], registry=r)
        self.finished = Counter("amoe_requests_finished", "Generation requests by finish reason",
                                ["model", "finish_reason"], registry=r)
        # Data plane (refreshed on scrape).
        self.dp_up = Gauge("amoe_dataplane_up", "1 if the last stats() call of the model's link succeeded",
                           ["model"], registry=r)
        self.dp_queue_mean = Gauge("amoe_dataplane_queue_depth_mean", "Mean μ-queue depth",
                                   ["model", "rank", "block", "slot"], registry=r)
        self.dp_queue_max = Gauge("amoe_dataplane_queue_depth_max", "Max μ-queue depth",
                                  ["model", "rank", "block", "slot"], registry=r)
        self.dp_tokens = Gauge("amoe_dataplane_tokens_per_layer", "Tokens processed per (block, expert slot)",
                               ["model", "rank", "block", "slot"], registry=r)
        self.dp_batch = Gauge("amoe_dataplane_batch_size_count", "Executed batches per batch-size bucket",
                              ["model", "rank", "bucket"], registry=r)
        self.dp_idle_frac = Gauge("amoe_dataplane_idle_fraction", "Fraction of time a rank was idle",
                                  ["model", "rank", "role"], registry=r)
        self.dp_busy = Gauge("amoe_dataplane_busy_seconds", "Busy seconds of a rank", ["model", "rank", "role"],
                             registry=r)
        self.dp_idle = Gauge("amoe_dataplane_idle_seconds", "Idle seconds of a rank", ["model", "rank", "role"],
                             registry=r)
        self.gw_waiting = Gauge("amoe_gateway_waiting_requests", "Requests waiting in the gateway", ["model"],
                                registry=r)
        self.gw_running = Gauge("amoe_gateway_running_requests", "Requests running in the data plane", ["model"],
                                registry=r)
        self.gw_kv_free = Gauge("amoe_gateway_kv_free_blocks", "Free KV blocks per attention rank",
                                ["model", "rank"], registry=r)
        self._dp_gauges = [self.dp_queue_mean, self.dp_queue_max, self.dp_tokens, self.dp_batch,
                           self.dp_idle_frac, self.dp_busy, self.dp_idle, self.gw_waiting, self.gw_running,
                           self.gw_kv_free]
        self._scrape_lock = asyncio.Lock()

    # ------------------------------------------------------------------ data plane

    def _apply_stats(self, model: str, stats: Any) -> None:
        if not isinstance(stats, dict):
            return
        ranks = stats.get("ranks")
        if isinstance(ranks, dict):
            for rank, rs in ranks.items():
                if not isinstance(rs, dict):
                    continue
                rank = str(rank)
                role = str(rs.get("role", "unknown"))
                for key, gauge in (("queue_depth_mean", self.dp_queue_mean), ("queue_depth_max", self.dp_queue_max),
                                   ("tokens_per_layer", self.dp_tokens)):
                    for b, s, v in _grid(rs.get(key)):
                        gauge.labels(model, rank, str(b), str(s)).set(v)
                hist = rs.get("batch_hist")
                if isinstance(hist, dict):
                    for bucket, count in hist.items():
                        n = _num(count)
                        if n is not None:
                            self.dp_batch.labels(model, rank, str(bucket)).set(n)
                for key, gauge in (("idle_fraction", self.dp_idle_frac), ("busy_s", self.dp_busy),
                                   ("idle_s", self.dp_idle)):
                    n = _num(rs.get(key))
                    if n is not None:
                        gauge.labels(model, rank, role).set(n)
        gw = stats.get("gateway")
        if isinstance(gw, dict):
            for key, gauge in (("waiting", self.gw_waiting), ("running", self.gw_running)):
                n = _num(gw.get(key))
                if n is not None:
                    gauge.labels(model).set(n)
            kv = gw.get("kv_free_blocks")
            if isinstance(kv, dict):
                for rank, v in kv.items():
                    n = _num(v)
                    if n is not None:
                        self.gw_kv_free.labels(model, str(rank)).set(n)

    async def refresh_dataplane(self, links: dict[str, Any], timeout_s: float = 5.0) -> None:
        async def one(name, link):
            try:
                return name, await asyncio.wait_for(link.stats(), timeout_s)
            except Exception as exc:  # a scrape must never fail because a data plane is down
                log.debug("stats() of %s failed: %r", name, exc)
                return name, None

        async with self._scrape_lock:
            results = await asyncio.gather(*(one(n, l) for n, l in links.items()))
            for g in self._dp_gauges:
                g.clear()  # drop labels of ranks that went away
            for name, stats in results:
                self.dp_up.labels(name).set(0 if stats is None else 1)
                if stats is not None:
                    try:
                        self._apply_stats(name, stats)
                    except Exception:
                        log.exception("malformed stats from %s", name)

    def render(self) -> bytes:
        return generate_latest(self.registry)
