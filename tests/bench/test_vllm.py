"""System `vllm`: the server's command line and environment, the streaming client against a
stand-in server (coalesced chunks, errors), a missing venv recorded as skipped, and, when
.venv-vllm is installed (scripts/install-vllm.sh), a real vLLM CPU server on a tiny checkpoint."""

import asyncio
import json

import pytest

from amoe_serve.bench.bench_config import VllmConfig, load_bench_config
from amoe_serve.bench.run import run_bench
from amoe_serve.bench.vllm_baseline import (VllmUnavailable, cores_spec, drive, server_command, server_env,
                                            unavailable_reason, vllm_venv)
from amoe_serve.bench.workloads import BenchRequest, make_requests

# head_dim 32: vLLM's CPU attention has no kernel for 16.
TINY = ["model.hidden_size=64", "model.intermediate_size=96", "model.num_blocks=2", "model.num_experts=4",
        "model.num_heads=2", "model.head_dim=32", "model.num_kv_heads=1", "model.vocab_size=300"]


def test_cores_spec_compresses_runs():
    assert cores_spec({0, 1}) == "0-1"
    assert cores_spec({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert cores_spec({3}) == "3"


def test_unavailable_reasons(tmp_path):
    why = unavailable_reason(tmp_path / "nope")
    assert "no vLLM venv" in why and "install-vllm.sh" in why
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    assert "no vllm package" in unavailable_reason(venv)
    pkg = venv / "lib" / "python3.11" / "site-packages" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").touch()
    assert unavailable_reason(venv, 64) is None
    assert "head_dim 16" in unavailable_reason(venv, 16)
    assert vllm_venv(VllmConfig(venv=str(venv))) == venv


def test_server_command_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = VllmConfig(extra_args=["--enforce-eager"], omp_threads_bind="0-1", kvcache_space_gb=3)
    cmd = server_command(tmp_path, "/ckpt", 8123, cfg, 64, top_k=1)
    assert cmd[:3] == [str(tmp_path / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]
    s = " ".join(cmd)
    for part in ("--model /ckpt", "--host 127.0.0.1", "--port 8123", "--dtype float32", "--max-num-seqs 64",
                 "--skip-tokenizer-init", "--no-enable-prefix-caching"):
        assert part in s
    assert json.loads(cmd[cmd.index("--hf-overrides") + 1]) == {"num_experts_per_tok": 1}
    assert cmd[-1] == "--enforce-eager"
    assert "--hf-overrides" not in server_command(tmp_path, "/ckpt", 1, cfg, 4, top_k=None)
    env = server_env(tmp_path, cfg)
    assert "OMP_NUM_THREADS" not in env  # vLLM sizes its pool from the bind
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["VLLM_CPU_KVCACHE_SPACE"] == "3"


async def _stand_in(reader, writer):
    """An OpenAI completions stream: token ids in chunks of 1, 2, 1, ... (a coalesced one
    among them); max_tokens 13 answers HTTP 400."""
    head = await reader.readuntil(b"\r\n\r\n")
    n = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    body = json.loads(await reader.readexactly(n))
    assert body["stream"] and body["ignore_eos"] and body["temperature"] == 0 and body["model"] == "bench"
    if body["max_tokens"] == 13:
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbad")
    else:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        left, size = body["max_tokens"], 1
        while left:
            k = min(size, left)
            ev = {"choices": [{"index": 0, "text": "", "token_ids": list(range(k))}]}
            writer.write(f"data: {json.dumps(ev)}\n\n".encode())
            await writer.drain()
            await asyncio.sleep(0.002)
            left -= k
            size = 3 - size
        writer.write(b"data: [DONE]\n\n")
    await writer.drain()
    writer.close()


def test_drive_timestamps_every_token_of_a_stream():
    async def main():
        server = await asyncio.start_server(_stand_in, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reqs = [BenchRequest(list(range(3, 20)), 7, 0.0), BenchRequest([5, 6, 7], 4, 0.05),
                BenchRequest([8, 9], 13, 0.0)]
        async with server:
            return await drive(f"http://127.0.0.1:{port}", reqs, "stand-in", 10.0)

    p = asyncio.run(main())
    a, b, bad = p.traces
    assert len(a.token_s) == 7 and a.error is None and len(b.token_s) == 4 and b.error is None
    assert a.token_s[1] == a.token_s[2]  # two tokens in one chunk: the chunk's arrival time
    assert b.submit_s - a.submit_s >= 0.045  # sent at its arrival time
    assert bad.error.startswith("HTTP 400") and not bad.token_s
    assert p.stats["stream_chunks"] == 5 + 3 and p.wall_s > 0


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_missing_venv_is_recorded_as_skipped(tmp_path):
    cfg = load_bench_config(None, [*TINY, "systems=[vllm]", "num_requests=2", f"vllm.venv={tmp_path / 'none'}"])
    assert run_bench(cfg, tmp_path / "out", tmp_path / "cache") == []
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["records"] == [] and doc["skipped"][0]["system"] == "vllm"
    assert "no vLLM venv" in doc["skipped"][0]["reason"]
    assert "Skipped: `vllm`" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_head_dim_16_is_skipped_not_started(tmp_path):
    venv = vllm_venv(VllmConfig())
    if unavailable_reason(venv):
        pytest.skip(unavailable_reason(venv))
    cfg = load_bench_config(None, [*TINY, "model.head_dim=16", "systems=[vllm]", "num_requests=2"])
    run_bench(cfg, tmp_path / "out", tmp_path / "cache")
    (s,) = json.loads((tmp_path / "out" / "results.json").read_text())["skipped"]
    assert "head_dim 16" in s["reason"] and not (tmp_path / "out" / "vllm-server.log").exists()


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
@pytest.mark.timeout(900)
def test_vllm_serves_the_bench_requests(tmp_path):
    why = unavailable_reason(vllm_venv(VllmConfig()), 32)
    if why:
        pytest.skip(why)
    out = tmp_path / "out"
    cfg = load_bench_config(None, [*TINY, "systems=[vllm]", "num_requests=3", "request_rates=[0.0,4.0]",
                                   "vllm.kvcache_space_gb=1", "vllm.extra_args=[--enforce-eager]"])
    try:
        recs = run_bench(cfg, out, tmp_path / "cache")
    except VllmUnavailable as e:  # never: run_bench records it
        pytest.fail(str(e))
    doc = json.loads((out / "results.json").read_text())
    assert doc["skipped"] == [], doc["skipped"]
    assert sorted(r["request_rate"] for r in recs) == [0.0, 4.0]
    for r in recs:
        assert r["failed_requests"] == 0, r["errors"]
        want = sum(q.max_tokens for q in make_requests("short", 3, r["request_rate"], 300, 0))
        assert r["output_tokens"] == want  # every token of every request came back
        assert r["itl_ms_p50"] > 0 and r["ttft_ms_p50"] > 0 and r["output_tokens_per_s"] > 0
    (g,) = doc["goodput"]
    assert g["system"] == "vllm" and g["saturation_tokens_per_s"] == recs[0]["output_tokens_per_s"]


def test_drive_times_out_and_fails_what_is_unfinished():
    async def main():
        server = await asyncio.start_server(_stand_in, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await drive(f"http://127.0.0.1:{port}", [BenchRequest([3, 4], 400, 0.0)], "stand-in", 0.05)

    (t,) = asyncio.run(main()).traces
    assert t.error.startswith("timed out") and 0 < len(t.token_s) < 400


def _fake_venv(tmp_path, script: str):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text("#!/bin/bash\n" + script)
    py.chmod(0o755)
    return venv


def _pids_running(marker: str) -> list[int]:
    from pathlib import Path
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                out.append(int(d.name))
        except OSError:
            pass
    return out


def test_a_server_that_never_gets_healthy_is_stopped_with_its_children(tmp_path):
    from amoe_serve.bench.vllm_baseline import VllmServer
    marker = f"{tmp_path.name}-never-healthy"
    # A "server" with a child of its own that never answers /health.
    venv = _fake_venv(tmp_path, f"bash -c 'sleep 300; : {marker}' &\nbash -c 'sleep 301; : {marker}'\n")
    server = VllmServer(venv, "/ckpt", VllmConfig(), 4, None, tmp_path / "log" / "vllm-server.log")
    with pytest.raises(VllmUnavailable, match="not healthy after 2 s"):
        server.start(timeout=2.0)
    assert server.proc is None and _pids_running(marker) == []


def test_a_server_that_exits_at_startup_says_why(tmp_path):
    from amoe_serve.bench.vllm_baseline import VllmServer
    venv = _fake_venv(tmp_path, "echo 'RuntimeError: no CPU kernel for this' >&2\nexit 3\n")
    server = VllmServer(venv, "/ckpt", VllmConfig(), 4, None, tmp_path / "vllm-server.log")
    with pytest.raises(VllmUnavailable, match="exited with code 3.*no CPU kernel for this"):
        server.start(timeout=30.0)
