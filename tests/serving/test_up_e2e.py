"""The whole stack as a user runs it: `amoe-serve up` (mpiexec data planes + Ray Serve ingress),
real HTTP clients, two models, every error status provoked for real, a killed data plane that
comes back, and a SIGTERM that leaves nothing behind."""

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from amoe_serve.default_model import ensure_default_model
from amoe_serve.procs import alive, descendants
from amoe_serve.serving.attach import free_port
from tests.serving.stack import up_stack
from tests.support import PROMPTS, REPO, read_results, run_cli, run_group, write_requests

KEY = "test-api-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
pytestmark = [pytest.mark.mpi(ranks=4), pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def stack(checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("up")
    port = free_port()
    # The served copy gets the default model's byte-level tokenizer (ids < 259 fit its vocab of
    # 300), so text prompts work too; token ids are the same either way.
    mix = tmp / "mixtral"
    shutil.copytree(checkpoints["mixtral"], mix)
    default = ensure_default_model(tmp / "cache")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default / f, mix / f)
    cfg = {
        "model": {"path": str(mix)},
        "deployment": {"mode": "aep", "attention_ranks": 1, "expert_ranks": 2},
        "link": {"model_name": "mix"},
        "serving": {"port": port, "api_keys": [KEY], "max_concurrent_requests": 3, "max_tokens_limit": 512,
                    "extra_models": [{"name": "qwen", "path": str(checkpoints["qwen2_moe"]),
                                      "overrides": ["deployment.expert_ranks=3"]}]},
    }
    with up_stack(tmp, cfg, 60) as running:
        yield running


def _complete(base, body, headers=AUTH, timeout=60):
    return httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=timeout)


def test_completion_equals_generate_cli(stack, checkpoints, tmp_path):
    inp = write_requests(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    p = run_cli(["generate", "--model", str(checkpoints["mixtral"]), "--input", str(inp), "--output", str(out)])
    assert p.returncode == 0, p.stderr[-2000:]
    expected = [r["output_token_ids"] for r in read_results(out)]
    for prompt, want in zip(PROMPTS, expected):
        r = _complete(stack["base"], {"model": "mix", "prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["token_ids"] == want
        assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(want),
                                 "total_tokens": len(prompt) + len(want)}


def test_streaming_yields_the_same_tokens_incrementally(stack, hf_reference):
    chunks, usage = [], None
    with httpx.stream("POST", f"{stack['base']}/v1/completions", headers=AUTH, timeout=60,
                      json={"model": "mix", "prompt": PROMPTS[2], "max_tokens": 8, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        ev = json.loads(line.removeprefix("data: "))
        if ev.get("usage"):
            usage = ev["usage"]
        for ch in ev["choices"]:
            chunks.append(ch.get("token_ids", []))
    assert sum(chunks, []) == hf_reference["mixtral"][2]
    assert sum(1 for c in chunks if c) >= 2  # more than one chunk carried tokens
    assert usage["completion_tokens"] == 8 and usage["prompt_tokens"] == len(PROMPTS[2])


def test_two_models_each_answer_their_own(stack, hf_reference):
    for name, arch in (("mix", "mixtral"), ("qwen", "qwen2_moe")):
        r = _complete(stack["base"], {"model": name, "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == hf_reference[arch][1], name
    models = httpx.get(f"{stack['base']}/v1/models", headers=AUTH).json()
    assert sorted(m["id"] for m in models["data"]) == ["mix", "qwen"]


def test_error_statuses_in_openai_shape(stack):
    base = stack["base"]
    cases = [
        (_complete(base, {"model": "mix", "prompt": [1, 2]}, headers={}), 401),
        (_complete(base, {"model": "mix", "prompt": [1, 2]}, headers={"Authorization": "Bearer wrong"}), 401),
        (_complete(base, {"model": "nope", "prompt": [1, 2]}), 404),
        (_complete(base, {"model": "mix", "prompt": [1, 2], "max_tokens": 100000}), 400),
        (_complete(base, {"model": "mix", "prompt": [1, 99999]}), 400),
        (_complete(base, {"model": "mix", "prompt": [1, 2], "max_tokens": "many"}), 422),
        (httpx.post(f"{base}/v1/completions", content=b"{not json", headers={**AUTH, "content-type": "application/json"}), 422),
    ]
    for r, status in cases:
        assert r.status_code == status, (status, r.text)
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and "type" in err


def test_overload_gets_429_with_retry_after(stack):
    async def main():
        async with httpx.AsyncClient(base_url=stack["base"], headers=AUTH, timeout=120) as c:
            body = {"model": "mix", "prompt": PROMPTS[0], "max_tokens": 240, "ignore_eos": True}
            return await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(8)])
    rs = asyncio.run(main())
    codes = sorted(r.status_code for r in rs)
    assert codes.count(200) >= 3 and codes.count(429) >= 1, codes
    assert all(r.headers.get("retry-after") for r in rs if r.status_code == 429)
    assert all(len(r.json()["choices"][0]["token_ids"]) == 240 for r in rs if r.status_code == 200)


def _metric(base: str, name: str, labels: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    m = re.search(rf'{name}{{{labels}}} ([0-9.e+-]+)', text)
    return float(m.group(1)) if m else -1.0


def _gateway_running(base: str, model: str) -> float:
    return _metric(base, "amoe_gateway_running_requests", f'model="{model}"')


def test_client_disconnect_cancels_in_the_data_plane(stack):
    base = stack["base"]
    with httpx.stream("POST", f"{base}/v1/completions", headers=AUTH, timeout=60,
                      json={"model": "mix", "prompt": PROMPTS[0], "max_tokens": 240, "ignore_eos": True,
                            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one token arrived: hang up
    assert _gateway_running(base, "mix") >= 0
    deadline = time.monotonic() + 20
    while _gateway_running(base, "mix") != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _gateway_running(base, "mix") == 0
    # every KV block of the attention rank is free again (kv_cache.num_blocks defaults to 1024)
    assert _metric(base, "amoe_gateway_kv_free_blocks", 'model="mix",rank="1"') == 1024


def test_dead_data_plane_gives_503_then_comes_back(stack):
    base = stack["base"]
    ranks = [p for p in descendants(stack["proc"].pid)
             if b"rank_main" in Path(f"/proc/{p}/cmdline").read_bytes() and b"qwen" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert ranks, "no qwen data-plane processes found"
    os.kill(ranks[-1], signal.SIGKILL)
    t0 = time.monotonic()
    seen_503 = False
    while time.monotonic() - t0 < 20:
        r = _complete(base, {"model": "qwen", "prompt": PROMPTS[0], "max_tokens": 4}, timeout=30)
        if r.status_code == 503:
            seen_503 = True
            assert r.json()["error"]["message"]
            break
        time.sleep(0.2)
    assert seen_503
    ok = _complete(base, {"model": "mix", "prompt": PROMPTS[0], "max_tokens": 4})
    assert ok.status_code == 200  # the other model is unaffected
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # restarted with back-off on the same address
        r = _complete(base, {"model": "qwen", "prompt": PROMPTS[0], "max_tokens": 4}, timeout=30)
        if r.status_code == 200:
            break
        time.sleep(1)
    assert r.status_code == 200, r.text
    assert "restarting" in stack["log"].read_text()


@pytest.mark.extended  # ~60 s; Locust against an `up` stack: test_reliability.py's soak; its CLI,
@pytest.mark.slow      # CSV and plot: tests/loadtests/test_locust.py (on a stub server)
def test_locust_short_workload_against_the_stack(stack):
    """The documented headless Locust run, shortened: streams the paper's short workload.

    `extended` (not in the default run): test_reliability.py::test_short_soak_above_saturation
    drives an `amoe-serve up` stack with the same locustfile for 60 s (and checks more), and
    tests/loadtests/test_locust.py covers the headless CLI, its CSV/summary and loadtests.plot.
    Run it: `.venv/bin/python -m pytest -m extended tests/serving/test_up_e2e.py`."""
    tmp = stack["tmp"]
    locust = Path(sys.executable).parent / "locust"
    cmd = [str(locust), "-f", "loadtests/locustfile.py", "--headless", "-u", "4", "-r", "4", "-t", "32s",
           "--host", stack["base"], "--workload", "short", "--rate", "2", "--model", "mix", "--api-key", KEY,
           "--csv", str(tmp / "short"), "--summary-json", str(tmp / "short.json"), "--only-summary"]
    p = run_group(cmd, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:]
    summary = json.loads((tmp / "short.json").read_text())
    assert summary["requests"]["failed"] == 0
    assert summary["requests"]["ok"] >= 10 and summary["output_tokens"] > 0
    assert summary["duration_s"] >= 30
    plot = subprocess.run([sys.executable, "-m", "loadtests.plot", "--csv", str(tmp / "short"), "--summary-json",
                           str(tmp / "short.json"), "--output", str(tmp / "short.png")], cwd=REPO, timeout=120)
    assert plot.returncode == 0 and (tmp / "short.png").stat().st_size > 10_000


def test_private_ray_runs_with_token_auth(stack):
    """Ray's ports are not loopback-only and speak pickle: the private cluster `up` starts must
    require its random token (every Ray process of the stack carries it)."""
    from amoe_serve.procs import descendants
    up_pid = stack["proc"].pid
    ray_procs = []
    for pid in descendants(up_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"gcs_server" in cmd or b"raylet" in cmd:
            ray_procs.append(env)
    assert ray_procs, "no Ray processes found under `amoe-serve up`"
    for env in ray_procs:
        assert b"RAY_AUTH_MODE=token" in env
        assert any(e.startswith(b"RAY_AUTH_TOKEN=") and len(e) > len(b"RAY_AUTH_TOKEN=") + 30 for e in env)


def test_sigterm_tears_everything_down(stack):
    """Runs last in this module: stops the stack and checks for orphans."""
    proc = stack["proc"]
    kids = descendants(proc.pid)
    assert kids
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(90)
    left = [p for p in kids if alive(p)]
    assert not left, f"left behind: {left}"
    assert time.monotonic() - t0 < 90

