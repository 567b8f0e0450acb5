"""Runs a whole data-plane job as threads of one process over the in-process transport.

Same rank code as an MPI job; used by fast tests and for debugging without mpiexec.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterable

from amoe_serve.config import AmoeConfig
from amoe_serve.engine.job import make_gateway, report_fatal, run_worker, topology
from amoe_serve.model import load_spec
from amoe_serve.requests_io import GenerateRequest, GenerateResult
from amoe_transport import InProcHub
from amoe_serve.engine.serve_gateway import ServingGateway


def _start_workers(cfg: AmoeConfig) -> tuple[InProcHub, list[threading.Thread], list[str]]:
    """Every attention and expert rank as a thread; errors are reported to the gateway (rank 0)
    and collected in the returned list."""
    topo = topology(cfg)
    hub = InProcHub(topo.world_size)
    errors: list[str] = []

    def worker(rank: int) -> None:
        t = hub.transport(rank)
        try:
            run_worker(cfg, t)
        except BaseException as e:  # reported to the gateway, which raises RankFailed
            errors.append(report_fatal(t, topo, e))

    threads = [threading.Thread(target=worker, args=(r,), daemon=True, name=f"rank{r}")
               for r in range(1, topo.world_size)]
    for th in threads:
        th.start()
    return hub, threads, errors


@contextmanager
def inproc_job(cfg: AmoeConfig, join_s: float = 10.0):
    """A whole job as threads: yields its Gateway; on exit shuts it down, joins the ranks and
    raises what any of them reported (or that one did not stop)."""
    hub, threads, errors = _start_workers(cfg)
    gw = make_gateway(cfg, hub.transport(0), load_spec(cfg.model.path))
    try:
        yield gw
    finally:
        gw.shutdown(timeout=join_s)
        for th in threads:
            th.join(timeout=join_s)
    if errors:
        raise RuntimeError("; ".join(errors))
    stuck = [th.name for th in threads if th.is_alive()]
    if stuck:
        raise RuntimeError(f"ranks did not stop after SHUTDOWN: {', '.join(stuck)}")


def run_inproc(cfg: AmoeConfig, requests: Iterable[GenerateRequest], timeout: float = 300.0
               ) -> tuple[dict[str, GenerateResult], dict[int, dict]]:
    with inproc_job(cfg) as gw:
        gw.run(requests, timeout=timeout)
    return gw.results, gw.stats


@contextmanager
def serve_inproc(cfg: AmoeConfig):
    """A serving data plane as threads: yields the ServingGateway (its `server.address` is the
    link's host:port). Stops every rank on exit."""

    hub, threads, errors = _start_workers(cfg)
    g = ServingGateway(cfg, hub.transport(0), load_spec(cfg.model.path))

    def gateway() -> None:
        try:
            g.run()
        except BaseException as e:
            errors.append(f"gateway: {type(e).__name__}: {e}")

    gt = threading.Thread(target=gateway, daemon=True, name="gateway")
    gt.start()
    try:
        yield g
    finally:
        g.stop = True
        gt.join(timeout=10)
        g.gw.shutdown(timeout=10)
        g.server.close()
        for th in threads:
            th.join(timeout=10)
    if errors:
        raise RuntimeError("; ".join(errors))
