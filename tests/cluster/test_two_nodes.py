"""`sbatch -N 2 slurm/launch.sh` on a cluster of two network-namespace nodes (amoe-n0, amoe-n1):
Ray head on amoe-n0 and a worker on amoe-n1, the gateway and the attention rank on amoe-n0, the
two expert ranks on amoe-n1 (MPI over TCP between them), the ingress on amoe-n0, an endpoint
that names amoe-n0's address. Completions equal `amoe-serve generate` on one node, token for
token, in AEP and lockstep; scancel leaves nothing; a crash of amoe-n1 (every process on it
SIGKILLed) ends in-flight requests with an error event within 5 s, /health answers 503 within a
few seconds (the ingress replica and Serve's proxy are pinned to amoe-n0), and the job ends.

About 4 minutes on 2 cores. Needs root, `ip`, slurm-wlm (skipped otherwise).
"""

from __future__ import annotations

import subprocess
import threading
import time

import httpx
import pytest

from amoe_serve.default_model import ensure_default_model
from amoe_serve.procs import alive
from tests.cluster import jobs
from tests.cluster.netcluster import available, node_addr

pytestmark = [pytest.mark.cluster, pytest.mark.slurm]
_why_not = available()
if _why_not:
    pytestmark.append(pytest.mark.skip(reason=f"no namespace cluster here: {_why_not}"))

PORT = 8123  # inside amoe-n0's own network namespace: nothing else listens there
SBATCH = ("--ntasks-per-node=2",)  # 4 tasks: gateway + attention on amoe-n0, 2 experts on amoe-n1


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ensure_default_model(tmp_path_factory.mktemp("model") / "default")


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    return jobs.reference(model, tmp_path_factory.mktemp("ref"), "aep")


def _up(cluster2, model, tmp_path, *args):
    job = jobs.sbatch(cluster2, tmp_path, "--model", str(model), "--port", str(PORT), *args, sbatch_opts=SBATCH)
    url = jobs.wait_endpoint(cluster2, tmp_path, job)
    assert url == f"http://{node_addr(0)}:{PORT}/v1", url  # reachable from anywhere: no name needed
    out = jobs.output(tmp_path, job)
    assert f"AMOE_SERVE_ENDPOINT={url}" in out, out
    assert "MPI between nodes: MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp" in out, out
    return job, url


def _placement(cluster2, job):
    ranks = jobs.rank_nodes(cluster2, job)
    assert ranks == {0: "amoe-n0", 1: "amoe-n0", 2: "amoe-n1", 3: "amoe-n1"}, ranks
    procs = jobs.job_processes(job)
    raylets = jobs.wait_raylets(cluster2, job, ["amoe-n0", "amoe-n1"])
    assert raylets == ["amoe-n0", "amoe-n1"], raylets  # Ray head + one worker
    ingress = [cluster2.node_of_pid(p) for p, c in procs.items() if " ingress " in c]
    assert ingress == ["amoe-n0"], ingress
    # Serve's actors (Ray sets their process titles): the HTTP proxy (proxy_location=HeadOnly)
    # and the ingress replica (pinned by the head's amoe_head resource) run on the head as well.
    serve_actors = {c.split()[0]: cluster2.node_of_pid(p) for p, c in jobs.job_processes(job).items()
                    if c.startswith(("ray::ServeReplica:", "ray::ProxyActor"))}
    assert sorted(serve_actors.values()) == ["amoe-n0", "amoe-n0"], serve_actors
    return procs


def _scancel_leaves_nothing(cluster2, tmp_path, job, procs):
    subprocess.run([jobs.which("scancel"), job], env=cluster2.env, check=True, timeout=20)
    took = jobs.wait_gone(cluster2, job, 60)
    assert took < 45, f"teardown took {took:.0f} s"
    jobs.wait_nothing_left(job, 20)
    left = [p for p in procs if alive(p)]
    assert not left, left
    assert not (tmp_path / "endpoint").exists(), "the endpoint file of a stopped job must go"
    out = jobs.output(tmp_path, job)
    assert "received SIGTERM" in out and "stopped" in out, out


def test_lockstep_across_two_nodes_matches_one_node_and_scancel_leaves_nothing(cluster2, model, reference,
                                                                               tmp_path):
    job, url = _up(cluster2, model, tmp_path, "deployment.mode=lockstep")
    procs: dict = {}
    try:
        procs = _placement(cluster2, job)
        served = [jobs.complete(url, p) for p in jobs.PROMPTS]
    finally:
        _scancel_leaves_nothing(cluster2, tmp_path, job, procs)
    assert served == reference


def test_aep_across_two_nodes_matches_one_node_then_node_crash(cluster2, model, reference, tmp_path):
    job, url = _up(cluster2, model, tmp_path)
    try:
        _placement(cluster2, job)
        served = [jobs.complete(url, p) for p in jobs.PROMPTS]
        assert served == reference
        assert httpx.get(url.rsplit("/v1", 1)[0] + "/health", timeout=10).status_code == 200

        # ---- node crash: every process of amoe-n1 (slurmd, steps, expert ranks, Ray worker) SIGKILLed
        ended: dict = {}

        def stream():
            body = {"model": "default", "prompt": "Hello", "max_tokens": 2000, "ignore_eos": True,
                    "temperature": 0.0, "stream": True}
            chunks = []
            try:
                with httpx.stream("POST", f"{url}/completions", json=body, timeout=httpx.Timeout(60.0)) as r:
                    ended["status"] = r.status_code
                    for line in r.iter_lines():
                        chunks.append(line)
                        if len(chunks) == 5:
                            ended["streaming"] = time.monotonic()
            except httpx.HTTPError as e:  # the connection cut (e.g. the replica was on amoe-n1)
                ended["exception"] = repr(e)
            ended["at"] = time.monotonic()
            ended["chunks"] = chunks

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        deadline = time.monotonic() + 60
        while "streaming" not in ended and time.monotonic() < deadline and t.is_alive():
            time.sleep(0.05)
        assert "streaming" in ended, ended
        killed_at = time.monotonic()
        assert cluster2.kill_node(1)
        t.join(30)
        assert not t.is_alive(), "the in-flight request did not end"
        took = ended["at"] - killed_at
        tail = "\n".join(c for c in ended["chunks"][-8:] if c)
        done_ok = "data: [DONE]" in ended["chunks"] and '"error"' not in tail
        assert not done_ok, f"a request finished normally across a node crash: {tail}"
        assert took < 5, f"the in-flight request ended {took:.1f} s after the crash: {ended.get('exception')} {tail}"
        # The ingress is on amoe-n0: the stream is not cut, it ends with the ingress's error event.
        assert "exception" not in ended, f"the stream was cut: {ended['exception']} {tail}"
        assert '"error"' in tail, f"the in-flight request ended without an error event: {tail}"

        # /health answers (no hang) with a 503 within a few seconds: the ingress sees the gateway's
        # link close once the launcher's node watch stops the gateway (about 2 s after the crash).
        probes: list = []  # (s after the crash, s it took, status or error)
        answered = None
        while time.monotonic() - killed_at < 12:
            t0 = time.monotonic()
            try:
                got = httpx.get(url.rsplit("/v1", 1)[0] + "/health", timeout=8).status_code
            except httpx.HTTPError as e:
                got = type(e).__name__
            probes.append((round(t0 - killed_at, 1), round(time.monotonic() - t0, 1), got))
            if got != 200:
                answered = time.monotonic() - killed_at
                break
            time.sleep(0.2)
        assert answered is not None and answered < 8 and probes[-1][2] == 503, f"/health after the crash: {probes}"
        print(f"node crash: the request ended after {took:.1f} s, /health answered 503 after {answered:.1f} s")

        # The job ends by itself (the gateway exits; the launcher tears down), and nothing of it is left.
        jobs.wait_gone(cluster2, job, 60)
        out = jobs.output(tmp_path, job)
        assert "ERROR:" in out and "stopped" in out, out[-3000:]
        jobs.wait_nothing_left(job, 30)
        assert not (tmp_path / "endpoint").exists()
    finally:
        subprocess.run([jobs.which("scancel"), job], env=cluster2.env, timeout=20)
        cluster2.kill_node(1)  # whatever of it is left, then boot it again for later tests
        cluster2.restart_slurmd(1)
