"""Runs one workload point through a real data plane (AEP or lockstep): the MPI job is started
in serving mode, requests go over the link at their arrival times, every token is timestamped
where a client would see it, and the ranks' counters are read at the end."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from amoe_serve.bench.workloads import BenchRequest
from amoe_serve.config import AmoeConfig
from amoe_serve.link.client import LinkClient
from amoe_serve.serving.up import DataPlaneProcess, with_link_token


@dataclass
class RequestTrace:
    submit_s: float
    token_s: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class PointResult:
    traces: list[RequestTrace]
    wall_s: float
    stats: dict


async def _one(client: LinkClient, req: BenchRequest, t0: float, trace: RequestTrace) -> None:
    delay = t0 + req.arrival_s - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    trace.submit_s = time.perf_counter()
    try:
        async for ev in client.generate(req.prompt_token_ids, {"max_tokens": req.max_tokens, "ignore_eos": True}):
            if ev.token is not None:
                trace.token_s.append(time.perf_counter())
    except Exception as e:  # recorded, reported as a failed request
        trace.error = str(e)


async def _progress(label: str, traces: list[RequestTrace], total_tokens: int, t0: float, done: asyncio.Event):
    while not done.is_set():
        await asyncio.sleep(1.0)
        got = sum(len(t.token_s) for t in traces)
        el = time.perf_counter() - t0
        print(f"\r[bench] {label}: {got}/{total_tokens} tokens, {el:5.1f} s, {got / max(el, 1e-9):7.1f} tok/s ",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr, flush=True)


async def _drive(host: str, port: int, token: str, reqs: list[BenchRequest], label: str, timeout: float) -> PointResult:
    client = LinkClient(host, port, token)
    await client.connect()
    # Warm-up: one short request so first-touch costs stay out of the numbers.
    async for _ in client.generate(reqs[0].prompt_token_ids[:8], {"max_tokens": 2, "ignore_eos": True}):
        pass
    traces = [RequestTrace(0.0) for _ in reqs]
    t0 = time.perf_counter()
    done = asyncio.Event()
    prog = asyncio.create_task(_progress(label, traces, sum(r.max_tokens for r in reqs), t0, done))
    try:
        await asyncio.wait_for(asyncio.gather(*[_one(client, r, t0, tr) for r, tr in zip(reqs, traces)]), timeout)
    finally:
        done.set()
        await prog
    wall = max((t.token_s[-1] for t in traces if t.token_s), default=time.perf_counter()) - t0
    stats = await client.stats()
    await client.close()
    return PointResult(traces, wall, stats)


def run_point(cfg: AmoeConfig, reqs: list[BenchRequest], label: str, timeout: float) -> PointResult:
    with tempfile.TemporaryDirectory(prefix="amoe-bench-") as tmp:
        plane = DataPlaneProcess(label.replace(" ", "_").replace("/", "_"), with_link_token(cfg), Path(tmp))
        plane.start()
        try:
            host, port = plane.wait_ready(300)
            return asyncio.run(_drive(host, port, plane.cfg.link.token, reqs, label, timeout))
        finally:
            plane.stop()
