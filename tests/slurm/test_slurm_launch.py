"""`sbatch slurm/launch.sh` on a real (private, single-node) Slurm: the endpoint comes up and
answers like `amoe-serve generate --mode aep`, scancel leaves no process of the job behind,
and a data plane that cannot start ends the job by itself with a clear message."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from amoe_serve.default_model import ensure_default_model
from amoe_serve.procs import alive
from tests.slurm.cluster import SlurmCluster, available, free_port
from tests.support import REPO, job_processes, read_results, run_cli

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
_why_not = available()
if _why_not:
    pytestmark.append(pytest.mark.skip(reason=f"no Slurm here: {_why_not}"))

PROMPT, MAX_TOKENS = "Hello", 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    c = SlurmCluster(root)
    c.start()
    try:
        yield c
    finally:
        # The controller is private to this module: every job in it is ours. Jobs outlive
        # slurmd (their slurmstepd keeps running), so end them before the daemons.
        subprocess.run(["scancel", "--full", "--quiet", "--partition", "debug"], env=c.env, capture_output=True)
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and _squeue(c, ""):
            time.sleep(1)
        c.stop()
        shutil.rmtree(root / "state", ignore_errors=True)
        shutil.rmtree(root / "spool", ignore_errors=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ensure_default_model(tmp_path_factory.mktemp("model") / "default")


def _squeue(c: SlurmCluster, job: str) -> str:
    args = ["squeue", "-h", "-o", "%i %T"] + (["-j", job] if job else [])
    return subprocess.run(args, env=c.env, capture_output=True, text=True).stdout.strip()


def _job_env(c: SlurmCluster) -> dict:
    # The job runs with the submitter's environment: the venv's python, ray and mpiexec first.
    return dict(c.env, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
                OMP_NUM_THREADS="1")


def _sbatch(c: SlurmCluster, tmp: Path, *args: str) -> str:
    opts = ["--parsable", f"--output={tmp}/job-%j.out", "--time=00:10:00"]
    if (os.cpu_count() or 1) < 4:
        opts.append("--overcommit")  # the default config runs 4 tasks
    r = subprocess.run(["sbatch", *opts, str(REPO / "slurm" / "launch.sh"), "--job-dir", str(tmp / "job"),
                        "--endpoint-file", str(tmp / "endpoint"), *args],
                       cwd=REPO, env=_job_env(c), capture_output=True, text=True)
    assert r.returncode == 0, f"sbatch failed: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def _output(tmp: Path, job: str) -> str:
    f = tmp / f"job-{job}.out"
    return f.read_text(errors="replace") if f.exists() else "(no job output yet)"


def _wait_gone(c: SlurmCluster, job: str, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not _squeue(c, job):
            return time.monotonic() - t0
        time.sleep(0.5)
    raise AssertionError(f"job {job} still in the queue after {timeout:.0f} s: {_squeue(c, job)}")


def test_sbatch_serves_completions_and_scancel_leaves_nothing(cluster, model, tmp_path):
    port = free_port()
    job = _sbatch(cluster, tmp_path, "--model", str(model), "--port", str(port))
    endpoint = tmp_path / "endpoint"
    deadline = time.monotonic() + 180
    while not endpoint.exists():
        state = _squeue(cluster, job)
        assert state, f"job {job} ended before its endpoint came up:\n{_output(tmp_path, job)}"
        assert time.monotonic() < deadline, f"no endpoint after 180 s ({state}):\n{_output(tmp_path, job)}"
        time.sleep(1)
    url = endpoint.read_text().strip()
    assert url == f"http://{socket.gethostname()}:{port}/v1", url
    out = _output(tmp_path, job)
    assert f"AMOE_SERVE_ENDPOINT={url}" in out, out

    try:
        body = {"model": "default", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                "temperature": 0.0}
        r = httpx.post(f"{url}/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["usage"]["completion_tokens"] == MAX_TOKENS, got
        assert got["choices"][0]["finish_reason"] == "length", got
        served_ids = got["choices"][0]["token_ids"]
        assert len(served_ids) == MAX_TOKENS, got

        procs = job_processes(job)
        cmds = list(procs.values())
        assert sum("amoe_serve.engine.rank_main" in c and "srun" not in c for c in cmds) == 4, cmds
        assert any("raylet" in c for c in cmds) and any("gcs_server" in c for c in cmds), cmds
        assert any(" ingress " in c for c in cmds), cmds
    finally:
        subprocess.run(["scancel", job], env=cluster.env, check=True)
    took = _wait_gone(cluster, job, 60)
    out = _output(tmp_path, job)
    assert "received SIGTERM" in out and "stopped" in out, out
    time.sleep(1)
    left = {p: c for p, c in job_processes(job).items()}
    left.update({p: procs[p] for p in procs if alive(p) and p not in left})
    assert not left, f"processes of job {job} left after scancel: {left}"
    assert not endpoint.exists(), "the endpoint file of a stopped job must go"
    assert took < 45, f"teardown took {took:.0f} s"

    # The same request through `amoe-serve generate --mode aep` gives the same tokens.
    req = tmp_path / "req.jsonl"
    req.write_text(json.dumps({"id": "a", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                               "temperature": 0.0}) + "\n")
    res = tmp_path / "res.jsonl"
    g = run_cli(["generate", "--model", str(model), "--mode", "aep", "--attention-ranks", "1",
                 "--expert-ranks", "2", "--input", str(req), "--output", str(res)])
    assert g.returncode == 0, g.stderr
    assert read_results(res)[0]["output_token_ids"] == served_ids


def test_broken_checkpoint_fails_the_job_at_once(cluster, model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    t0 = time.monotonic()
    job = _sbatch(cluster, tmp_path, "--model", str(broken), "--port", str(free_port()))
    _wait_gone(cluster, job, 60)
    out = _output(tmp_path, job)
    assert "ERROR: invalid configuration or checkpoint" in out, out
    assert "amoe-serve: error:" in out and "safetensors" in out.lower(), out
    assert time.monotonic() - t0 < 60
    assert not job_processes(job)


def test_data_plane_that_dies_at_start_ends_the_job(cluster, model, tmp_path):
    """The checkpoint is fine, but the gateway cannot bind its link port (taken): the ranks
    abort, srun exits, and the job ends with a message naming the data plane."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        t0 = time.monotonic()
        job = _sbatch(cluster, tmp_path, "--model", str(model), "--port", str(free_port()), f"link.port={busy}")
        took = _wait_gone(cluster, job, 90)
    out = _output(tmp_path, job)
    assert "ERROR: the data plane (srun step) exited with code" in out, out
    assert "before the gateway came up" in out and "stopped" in out, out
    assert time.monotonic() - t0 < 90 and took < 90
    assert not job_processes(job)
    assert not (tmp_path / "endpoint").exists()
