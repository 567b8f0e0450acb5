"""The fault matrix on three namespace nodes (2-4 minutes on 2 cores; `extended`: left out of
CI, whose 2-node test already covers a node crash across nodes; #17 allows the fault matrix
as a marked test with a documented command):

  sudo .venv/bin/python -m pytest -m extended tests/cluster/test_three_nodes.py

* A mixed layout, `slurm.node_of_rank=[0,1,1,2]`: the gateway on amoe-n0, the attention rank and
  one expert rank on amoe-n1, the other expert rank on amoe-n2; a Ray worker on each of amoe-n1
  and amoe-n2. Completions equal `amoe-serve generate --mode aep` on one node.
* A link cut: amoe-n2's cable (the root side of its veth) down for 10 s while a request streams.
  Nothing hangs: the launcher's node watch misses amoe-n2's Ray worker twice, kills the gateway
  (the request ends with an error, /health turns red) and ends the job. When the link comes back,
  Slurm on amoe-n2 ends what was left of the job there, and nothing of it is left anywhere.
"""

from __future__ import annotations

import subprocess
import threading
import time

import httpx
import pytest

from amoe_serve.default_model import ensure_default_model
from tests.cluster import jobs
from tests.cluster.netcluster import available, node_addr

pytestmark = [pytest.mark.cluster, pytest.mark.slurm, pytest.mark.slow, pytest.mark.extended]
_why_not = available()
if _why_not:
    pytestmark.append(pytest.mark.skip(reason=f"no namespace cluster here: {_why_not}"))

PORT = 8123


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ensure_default_model(tmp_path_factory.mktemp("model") / "default")


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    return jobs.reference(model, tmp_path_factory.mktemp("ref"), "aep")


def _stream(url: str, ended: dict) -> None:
    body = {"model": "default", "prompt": "Hello", "max_tokens": 2000, "ignore_eos": True, "temperature": 0.0,
            "stream": True}
    chunks = []
    try:
        with httpx.stream("POST", f"{url}/completions", json=body, timeout=httpx.Timeout(60.0)) as r:
            for line in r.iter_lines():
                chunks.append(line)
                if len(chunks) == 5:
                    ended["streaming"] = time.monotonic()
    except httpx.HTTPError as e:
        ended["exception"] = repr(e)
    ended["at"] = time.monotonic()
    ended["chunks"] = chunks


def test_mixed_layout_then_link_cut(cluster3, model, reference, tmp_path):
    job = jobs.sbatch(cluster3, tmp_path, "--model", str(model), "--port", str(PORT), "slurm.node_of_rank=[0,1,1,2]",
                      nodes=3, sbatch_opts=("--ntasks-per-node=2",))
    cut = False
    try:
        url = jobs.wait_endpoint(cluster3, tmp_path, job)
        assert url == f"http://{node_addr(0)}:{PORT}/v1", url
        ranks = jobs.rank_nodes(cluster3, job)
        assert ranks == {0: "amoe-n0", 1: "amoe-n1", 2: "amoe-n1", 3: "amoe-n2"}, ranks
        raylets = jobs.wait_raylets(cluster3, job, ["amoe-n0", "amoe-n1", "amoe-n2"])
        assert raylets == ["amoe-n0", "amoe-n1", "amoe-n2"], raylets
        served = [jobs.complete(url, p) for p in jobs.PROMPTS]
        assert served == reference

        ended: dict = {}
        t = threading.Thread(target=_stream, args=(url, ended), daemon=True)
        t.start()
        deadline = time.monotonic() + 60
        while "streaming" not in ended and time.monotonic() < deadline and t.is_alive():
            time.sleep(0.05)
        assert "streaming" in ended, ended
        cut_at = time.monotonic()
        cluster3.link(2, up=False)
        cut = True
        t.join(30)
        assert not t.is_alive(), "the in-flight request hangs over a cut link"
        tail = "\n".join(c for c in ended["chunks"][-8:] if c)
        assert "data: [DONE]" not in ended["chunks"] or '"error"' in tail, tail
        took = ended["at"] - cut_at
        red = None
        while time.monotonic() - cut_at < 30:
            try:
                ok = httpx.get(url.rsplit("/v1", 1)[0] + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                ok = False
            if not ok:
                red = time.monotonic() - cut_at
                break
            time.sleep(0.2)
        assert red is not None, "/health stayed green"
        # The ingress replica is pinned to amoe-n0 (the head's amoe_head resource): the node watch
        # misses amoe-n2 twice (1 s probes), kills the gateway, and the stream gets its error event.
        print(f"link cut: the request ended after {took:.1f} s, /health red after {red:.1f} s")
        assert "exception" not in ended and '"error"' in tail, f"{ended.get('exception')} {tail}"
        assert took < 10, f"the in-flight request ended {took:.1f} s after the cut"
        left = 10 - (time.monotonic() - cut_at)
        if left > 0:
            time.sleep(left)
        cluster3.link(2, up=True)
        cut = False
        jobs.wait_gone(cluster3, job, 90)
        out = jobs.output(tmp_path, job)
        assert "node amoe-n2 is lost" in out and "stopped" in out, out[-3000:]
        jobs.wait_nothing_left(job, 90)  # amoe-n2's slurmd ends the rest once it hears again
    finally:
        if cut:
            cluster3.link(2, up=True)
        subprocess.run([jobs.which("scancel"), job], env=cluster3.env, timeout=20)
