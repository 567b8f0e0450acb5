"""Helpers for `sbatch slurm/launch.sh` jobs on the namespace cluster: submit, wait for the
endpoint, list a job's processes (and the node each runs on), wait for it to leave the queue,
and the one-node reference (`amoe-serve generate --mode aep` on this machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.cluster.netcluster import NetCluster, which
from tests.support import job_processes

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["Hello", "The capital of France is", "1 2 3 4"]
MAX_TOKENS = 8


def job_env(c: NetCluster, **extra: str) -> dict:
    # The job runs with the submitter's environment: the venv's python, ray and mpiexec first.
    return dict(c.env, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
                RAY_USAGE_STATS_ENABLED="0", **extra)


def sbatch(c: NetCluster, tmp: Path, *args: str, nodes: int = 2, sbatch_opts=(), env_extra=None) -> str:
    opts = ["--parsable", f"--output={tmp}/job-%j.out", "--time=00:10:00", f"--nodes={nodes}", *sbatch_opts]
    r = subprocess.run([which("sbatch"), *opts, str(REPO / "slurm" / "launch.sh"), "--job-dir", str(tmp / "job"),
                        "--endpoint-file", str(tmp / "endpoint"), *args],
                       cwd=REPO, env=job_env(c, **(env_extra or {})), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"sbatch failed: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def squeue(c: NetCluster, job: str) -> str:
    r = subprocess.run([which("squeue"), "-h", "-o", "%i %T", "-j", job], env=c.env, capture_output=True, text=True,
                       timeout=20)
    return r.stdout.strip()


def output(tmp: Path, job: str) -> str:
    f = tmp / f"job-{job}.out"
    return f.read_text(errors="replace") if f.exists() else "(no job output yet)"


def wait_endpoint(c: NetCluster, tmp: Path, job: str, timeout: float = 240) -> str:
    endpoint = tmp / "endpoint"
    deadline = time.monotonic() + timeout
    while not endpoint.exists():
        state = squeue(c, job)
        assert state, f"job {job} ended before its endpoint came up:\n{output(tmp, job)}\n{c.logs(10)}"
        assert time.monotonic() < deadline, f"no endpoint after {timeout:.0f} s ({state}):\n{output(tmp, job)}"
        time.sleep(1)
    return endpoint.read_text().strip()


def wait_gone(c: NetCluster, job: str, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not squeue(c, job):
            return time.monotonic() - t0
        time.sleep(0.5)
    raise AssertionError(f"job {job} still in the queue after {timeout:.0f} s: {squeue(c, job)}")


def rank_nodes(c: NetCluster, job: str) -> dict[int, str]:
    """MPI rank -> node of every rank_main process of the job (SLURM_PROCID of the python)."""
    out = {}
    for pid, cmd in job_processes(job).items():
        if "amoe_serve.engine.rank_main" not in cmd or cmd.split()[0].endswith(("srun", "bash")):
            continue
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().decode(
                errors="replace").split("\0") if "=" in kv)
        except OSError:
            continue
        out[int(env["SLURM_PROCID"])] = c.node_of_pid(pid)
    return out


def wait_raylets(c: NetCluster, job: str, nodes: list[str], timeout: float = 90) -> list[str]:
    """Nodes with a raylet of the job, once every one of `nodes` has one (workers join the head
    asynchronously, and may still be starting when the endpoint is up)."""
    deadline = time.monotonic() + timeout
    while True:
        got = sorted(c.node_of_pid(p) for p, cmd in job_processes(job).items() if "/raylet " in cmd)
        if got == sorted(nodes) or time.monotonic() > deadline:
            return got
        time.sleep(1)


def wait_nothing_left(job: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    left = job_processes(job)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = job_processes(job)
    assert not left, f"processes of job {job} left: {left}"


def complete(url: str, prompt: str, max_tokens: int = MAX_TOKENS, timeout: float = 120) -> list[int]:
    body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}
    r = httpx.post(f"{url}/completions", json=body, timeout=timeout)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["choices"][0]["finish_reason"] == "length", got
    return got["choices"][0]["token_ids"]


def reference(model: Path, tmp: Path, mode: str = "aep") -> list[list[int]]:
    """`amoe-serve generate --mode MODE` on this machine (one node, mpiexec), PROMPTS in order."""
    req = tmp / "req.jsonl"
    req.write_text("".join(json.dumps({"id": f"r{i}", "prompt": p, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                                       "temperature": 0.0}) + "\n" for i, p in enumerate(PROMPTS)))
    res = tmp / "res.jsonl"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "amoe_serve.cli", "generate", "--model", str(model), "--mode", mode,
                        "--attention-ranks", "1", "--expert-ranks", "2", "--input", str(req), "--output", str(res)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in res.read_text().splitlines()]
    return [r["output_token_ids"] for r in rows]
