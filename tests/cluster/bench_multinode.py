"""AEP vs lockstep tokens/s with the expert ranks on another node, on the namespace cluster.

    sudo .venv/bin/python -m tests.cluster.bench_multinode --requests 16 --out out/multinode

Builds a 2-node cluster (tests/cluster/netcluster.py; removed at the end), writes the bench
model of configs/bench/paper-short.yaml (Mixtral-like random weights, exponential routing skew,
top-1), and for each layout x system submits `sbatch slurm/launch.sh` with 1 gateway + 1
attention + 2 expert ranks:

  2 nodes   gateway + attention on amoe-n0, both expert ranks on amoe-n1 (MPI over TCP/veth)
  1 node    all four ranks on amoe-n0 (MPICH shared memory)

then sends the same requests (the paper's short workload, seed 0, all at once: saturation)
to /v1/completions as token ids with ignore_eos, after a one-request warm-up, and reports
output tokens / wall seconds from the first send to the last answer. Writes results.json and
results.md under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from amoe_serve.bench.bench_config import load_bench_config
from amoe_serve.bench.run import bench_model_path
from amoe_serve.bench.workloads import make_requests
from amoe_serve.model import load_spec
from tests.cluster import jobs
from tests.cluster.netcluster import NetCluster, available, node_addr, which

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = {"2 nodes": (2, ["--ntasks-per-node=2"]), "1 node": (1, ["--ntasks=4"])}


async def _run(url: str, reqs, timeout: float) -> tuple[float, int]:
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=len(reqs) + 4)) as c:
        async def one(r):
            body = {"model": "default", "prompt": r.prompt_token_ids, "max_tokens": r.max_tokens,
                    "ignore_eos": True, "temperature": 0.0}
            resp = await c.post(f"{url}/completions", json=body)
            resp.raise_for_status()
            return resp.json()["usage"]["completion_tokens"]
        t0 = time.perf_counter()
        toks = await asyncio.gather(*(one(r) for r in reqs))
        return time.perf_counter() - t0, sum(toks)


def point(c: NetCluster, tmp: Path, model: str, overrides: list[str], layout: str, system: str, reqs,
          timeout: float) -> dict:
    nodes, opts = LAYOUTS[layout]
    d = tmp / f"{layout.replace(' ', '')}-{system}"
    d.mkdir()
    job = jobs.sbatch(c, d, "--model", model, "--port", "8123", f"deployment.mode={system}",
                      "slurm.ready_timeout_s=600", "runtime.heartbeat_timeout_s=30", *overrides,
                      nodes=nodes, sbatch_opts=[*opts, "--overcommit"],
                      env_extra={"AMOE_ENDPOINT_HOST": node_addr(0)})  # 1 node: the URL names the hostname
    try:
        url = jobs.wait_endpoint(c, d, job, timeout=700)
        ranks = jobs.rank_nodes(c, job)
        asyncio.run(_run(url, reqs[:1], timeout))  # warm-up
        wall, toks = asyncio.run(_run(url, reqs, timeout))
    finally:
        subprocess.run([which("scancel"), job], env=c.env, timeout=20)
        jobs.wait_gone(c, job, 90)
    rec = {"layout": layout, "system": system, "ranks": {str(k): v for k, v in sorted(ranks.items())},
           "requests": len(reqs), "output_tokens": toks, "wall_s": round(wall, 2), "tokens_per_s": round(toks / wall, 2)}
    print(json.dumps(rec), flush=True)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--config", default=str(REPO / "configs/bench/paper-short.yaml"))
    ap.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    ap.add_argument("--systems", nargs="*", default=["aep", "lockstep"])
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=str(REPO / "out/multinode"))
    a = ap.parse_args()
    why = available()
    if why:
        print(f"bench_multinode: {why}", file=sys.stderr)
        return 2
    bcfg = load_bench_config(a.config)
    model = bench_model_path(bcfg, Path.home() / ".cache" / "amoe-serve")
    r = bcfg.routing
    overrides = [f"routing.mode={r.mode}", f"routing.rate={r.rate}", f"routing.top_k={r.top_k}",
                 f"routing.seed={r.seed}", *bcfg.dataplane]
    reqs = make_requests("short", a.requests, 0.0, load_spec(model).vocab_size, seed=0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="amoe-bench-mn-") as tmp:
        c = NetCluster(Path(tmp) / "cluster", 2)
        c.root.mkdir()
        c.start()
        try:
            for layout in a.layouts:
                for system in a.systems:
                    extra = list(bcfg.aep if system == "aep" else bcfg.lockstep)
                    results.append(point(c, Path(tmp), model, overrides + extra, layout, system, reqs, a.timeout))
                    (out / "results.json").write_text(json.dumps(results, indent=1))
        finally:
            c.scancel_all()
            c.stop()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| layout | system | requests | output tokens | wall s | tokens/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {x['layout']} | {x['system']} | {x['requests']} | {x['output_tokens']} | {x['wall_s']} | "
              f"{x['tokens_per_s']} |" for x in results]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
