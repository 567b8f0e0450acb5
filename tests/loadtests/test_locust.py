"""End-to-end test of the Locust load test against a stub OpenAI-compatible streaming server.

The stub (stdlib ``http.server`` in a thread, ephemeral port on 127.0.0.1) streams a few SSE chunks
with small sleeps, sends ``usage`` in a final chunk, answers every 4th completion with HTTP 429, and
fails with an OpenAI error body when the model is named "fail".
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loadtests.sse_client import CompletionStreamClient, error_message
from loadtests.workloads import make_request
from tests.support import run_in_group

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHUNKS = 8  # text chunks per response (the last one carries the remaining tokens)
CHUNK_SLEEP = 0.004


class _Stub(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, chunked: bool, reject_every: int, chunk_sleep: float = CHUNK_SLEEP) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.chunked = chunked
        self.reject_every = reject_every
        self.chunk_sleep = chunk_sleep
        self.lock = threading.Lock()
        self.n_completions = 0
        self.bodies: list[dict] = []

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)  # killed users drop their streams: fine

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Stub

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "stub-moe", "object": "model"}]})
        else:
            self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def _write(self, data: bytes) -> None:
        if self.server.chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.wfile.write(data)
        self.wfile.flush()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        with srv.lock:
            srv.n_completions += 1
            n = srv.n_completions
            srv.bodies.append(body)
        if self.path != "/v1/completions":
            return self._json(404, {"error": {"message": "not found"}})
        if body.get("model") == "fail":
            return self._json(500, {"error": {"message": "engine exploded", "type": "server_error"}})
        if srv.reject_every and n % srv.reject_every == 0:
            return self._json(429, {"error": {"message": "queue full", "type": "rate_limit_error"}})
        max_tokens = int(body["max_tokens"])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if srv.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

        def event(obj) -> None:
            self._write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        base = {"id": f"cmpl-{n}", "object": "text_completion", "created": 0, "model": body["model"]}
        self._write(b": keep-alive comment\n\n")
        event({**base, "choices": [{"index": 0, "text": "", "finish_reason": None}]})  # no text: ignored
        k = min(CHUNKS, max_tokens)
        for i in range(k):
            time.sleep(srv.chunk_sleep)
            text = "x" if i < k - 1 else "y" * (max_tokens - k + 1)
            last = i == k - 1
            event({**base, "choices": [{"index": 0, "text": text, "finish_reason": "length" if last else None}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            event({**base, "choices": [], "usage": {"prompt_tokens": len(body["prompt"]),
                                                    "completion_tokens": max_tokens,
                                                    "total_tokens": len(body["prompt"]) + max_tokens}})
        self._write(b"data: [DONE]\n\n")
        if srv.chunked:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()


def _serve(chunked: bool, reject_every: int, **kw) -> _Stub:
    srv = _Stub(chunked, reject_every, **kw)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


@pytest.fixture
def stub():
    srv = _serve(chunked=True, reject_every=4)
    yield srv
    srv.shutdown()
    srv.server_close()


# ---------------------------------------------------------------------------------------------
# SSE client
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "close-delimited"])
def test_sse_client_streams_and_times(chunked):
    srv = _serve(chunked=chunked, reject_every=0, chunk_sleep=0.03)
    try:
        client = CompletionStreamClient(srv.url, api_key="sk-test")
        for _ in range(2):  # the second request reuses (chunked) or reopens (close) the connection
            req = make_request("short", 3, model="stub-moe")
            res = client.stream(req.body)
            assert res.ok, res.error
            assert res.done and res.status == 200
            assert res.text_chunks == CHUNKS and len(res.itls) == CHUNKS - 1
            assert res.output_tokens == req.output_tokens  # from usage, not the chunk count
            # streamed, not buffered: the first token arrives well before the end
            assert res.ttft is not None and res.ttft < res.e2e - 0.1
            assert all(g > 0.01 for g in res.itls)
        client.close()
    finally:
        srv.shutdown()
        srv.server_close()


def test_sse_client_errors(stub):
    client = CompletionStreamClient(stub.url)
    res = client.stream(make_request("short", 1, model="fail").body)
    assert res.status == 500 and not res.ok and res.error == "engine exploded"
    assert error_message(b'{"detail": "bad"}') == "bad"
    assert error_message(b"plain text") == "plain text"
    dead = CompletionStreamClient("http://127.0.0.1:1", timeout=2)
    res = dead.stream(make_request("short", 1).body)
    assert res.status == 0 and not res.ok and "ConnectionRefused" in res.error
    assert client.get_json("/v1/models")[1]["data"][0]["id"] == "stub-moe"


# ---------------------------------------------------------------------------------------------
# Locust, headless, end to end
# ---------------------------------------------------------------------------------------------


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    def timed_out(out, _):
        pytest.fail(f"locust did not finish in {timeout}s:\n{out[-4000:]}")

    return run_in_group(cmd, timeout, cwd=ROOT, merge_stderr=True, on_timeout=timed_out)


def _csv_rows(path: str) -> dict[str, dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return {(r["Type"] or r["Name"]): r for r in csv.DictReader(f)}


def _need(*mods: str) -> None:
    # find_spec, not import: importing locust would gevent-monkey-patch this pytest process.
    for m in mods:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} not installed (pip install -e '.[loadtest]')")


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_locust_headless_end_to_end(stub, tmp_path):
    _need("locust", "matplotlib")
    prefix = str(tmp_path / "out" / "short")
    summary_path = str(tmp_path / "out" / "short.json")
    cmd = [sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--headless",
           "-u", "3", "-r", "3", "-t", "8s", "--host", stub.url, "--workload", "short",
           "--rate", "6", "--seed", "1", "--csv", prefix, "--csv-full-history",
           "--summary-json", summary_path, "--only-summary"]
    proc = _run(cmd, timeout=60)
    assert proc.returncode == 0, proc.stdout[-4000:]

    # Requests the stub saw: the workload's shape, streaming, ignore_eos, model from /v1/models.
    assert stub.bodies
    for b in stub.bodies:
        assert b["stream"] is True and b["ignore_eos"] is True and b["model"] == "stub-moe"
        assert 70 <= b["max_tokens"] <= 130 and 30 <= len(b["prompt"]) <= 70

    rows = _csv_rows(prefix + "_stats.csv")
    for kind in ("TTFT", "ITL", "E2E", "TPOT", "REJECTED"):
        assert int(rows[kind]["Request Count"]) > 0, (kind, rows.keys())
    assert int(rows["E2E"]["Failure Count"]) == 0
    assert int(rows["ITL"]["Request Count"]) == (CHUNKS - 1) * int(rows["TTFT"]["Request Count"])
    assert os.path.getsize(prefix + "_stats_history.csv") > 0

    s = json.load(open(summary_path))
    req = s["requests"]
    assert s["workload"] == "short" and s["model"] == "stub-moe" and s["target_rate_rps"] == 6
    assert req["ok"] > 0 and req["failed"] == 0 and req["rejected_429"] > 0
    assert req["by_status"]["429"] == req["rejected_429"] and req["by_status"]["200"] == req["ok"]
    assert req["total"] == req["ok"] + req["rejected_429"]
    # every 4th request of the stub is rejected
    assert abs(req["rejected_429"] - stub.n_completions // 4) <= 3
    assert s["output_tokens"] >= 70 * req["ok"] and s["short_outputs"] == 0
    assert s["tokens_per_s"] > 0 and 5 < s["duration_s"] < 15
    assert s["ttft_ms"]["p50"] > 0 and s["ttft_ms"]["p99"] >= s["ttft_ms"]["p50"]
    assert s["itl_ms"]["p50"] > 0 and s["itl_ms"]["p99"] >= s["itl_ms"]["p50"]
    assert s["itl_ms"]["count"] == int(rows["ITL"]["Request Count"])
    # Poisson arrivals at 6/s over ~8 s: ~48 requests (loose bounds; 3 users are never saturated)
    assert s["arrivals"]["mode"] == "poisson"
    assert 20 <= req["total"] <= 90, req
    assert s["timeline"] and sum(r["output_tokens"] for r in s["timeline"]) >= s["output_tokens"] * 0.9

    png = str(tmp_path / "plot.png")
    p = subprocess.run([sys.executable, "-m", "loadtests.plot", "--csv", prefix, "--output", png,
                        "--summary-json", summary_path], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 10_000

    # Also without the summary (history-only fallback).
    png2 = str(tmp_path / "plot2.png")
    from loadtests.plot import main as plot_main

    assert plot_main(["--csv", prefix, "--output", png2]) == 0
    assert os.path.getsize(png2) > 10_000


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_locust_counts_server_errors_as_failures(stub, tmp_path):
    """Non-2xx other than 429 are E2E failures carrying the OpenAI error message (closed loop)."""
    _need("locust")
    prefix = str(tmp_path / "fail")
    summary_path = str(tmp_path / "fail.json")
    cmd = [sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--headless",
           "-u", "1", "-r", "1", "-t", "2s", "--host", stub.url, "--model", "fail",
           "--csv", prefix, "--summary-json", summary_path, "--only-summary"]
    proc = _run(cmd, timeout=40)
    assert proc.returncode == 1, proc.stdout[-4000:]  # locust's exit code on failures
    s = json.load(open(summary_path))
    req = s["requests"]
    assert req["failed"] > 0 and req["ok"] == 0
    assert req["by_status"]["500"] == req["failed"]
    assert s["errors"] == {"HTTP 500: engine exploded": req["failed"]}
    assert s["arrivals"]["mode"] == "closed-loop" and s["tokens_per_s"] == 0
    rows = _csv_rows(prefix + "_stats.csv")
    assert int(rows["E2E"]["Failure Count"]) == req["failed"]
    assert "engine exploded" in open(prefix + "_failures.csv").read()
