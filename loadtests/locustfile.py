"""Locust load test for an OpenAI-compatible streaming ``POST /v1/completions`` endpoint.

Run headless against a running server (see loadtests/README.md)::

    locust -f loadtests/locustfile.py --headless -u 8 -r 2 -t 60s --host http://127.0.0.1:8000 \
        --workload short --rate 2 --csv out/short --csv-full-history --summary-json out/short.json

Rows in Locust's statistics (``Type`` column = request_type, ``Name`` = ``/v1/completions``):

* ``TTFT``     time to first token: request sent -> first SSE chunk carrying text; response_length 1
* ``ITL``      inter-token latency: one sample per gap between consecutive text chunks; length 1
* ``TPOT``     time per output token of one request: (E2E - TTFT) / (output tokens - 1)
* ``E2E``      request sent -> ``data: [DONE]``; response_length = output tokens (0 on failure).
               Failures (non-2xx other than 429, transport errors, broken streams) are E2E failures
               carrying the OpenAI ``error.message``.
* ``REJECTED`` (name ``429 Too Many Requests``) back-pressure rejections: reported, not failures.

Output tokens are ``usage.completion_tokens`` when the server sends usage (requested through
``stream_options.include_usage``), else the number of text chunks.

Arrivals (``--rate R``): all users in a Locust process share one open-loop Poisson schedule
(:class:`loadtests.workloads.PoissonClock`): arrival k is at ``t_{k-1} + Exp(R)``, and each user,
once free, claims the next unclaimed arrival and sleeps until it (the first request of each user
too, in ``on_start``).  The aggregate request rate is therefore ~R with exponential inter-arrival
times, independent of ``-u`` -- provided ``-u`` is large enough that some user is idle at each
arrival (at least R x mean E2E latency, with headroom).  Arrivals that find every user busy are
sent late (as soon as a user frees up) and counted in the summary's ``arrivals.late``; raise ``-u``
if that is non-zero.  ``--rate 0`` (default) is closed loop: each user sends back to back.
``--rate`` is per Locust process: with ``--processes N`` or N workers, pass R/N.

Custom arguments: ``--workload short|medium|reasonable``, ``--model`` (default: first id of
``GET /v1/models``, else "default"), ``--api-key`` (default $OPENAI_API_KEY), ``--rate``,
``--summary-json PATH``, ``--seed``, ``--tokens-per-char``, ``--request-timeout``, ``--endpoint``.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
import random
import sys
import time
from collections import Counter
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # locust puts only this file's folder on sys.path
    sys.path.insert(0, _ROOT)

import gevent  # noqa: E402  (locust's dependency; already monkey-patched by locust)
from locust import User, events, task  # noqa: E402
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402

from loadtests.sse_client import CompletionStreamClient, StreamResult  # noqa: E402
from loadtests.workloads import WORKLOADS, PoissonClock, get_workload, make_request  # noqa: E402

log = logging.getLogger("amoe.loadtest")

ROW_NAME = "/v1/completions"
REJECTED_NAME = "429 Too Many Requests"


class OpenAIError(Exception):
    """A failed request: ``HTTP <status>: <error.message>`` or a transport/stream error."""


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--workload", choices=sorted(WORKLOADS), default="short", include_in_web_ui=True,
        help="AMoE paper workload: input/output token-length ranges (default short)",
    )
    parser.add_argument("--model", default="", include_in_web_ui=True,
                        help="model name in the request body (default: first of GET /v1/models)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""), is_secret=True,
                        help="bearer token (default $OPENAI_API_KEY)")
    parser.add_argument("--rate", type=float, default=0.0, include_in_web_ui=True,
                        help="target request rate (req/s, per Locust process) with Poisson arrivals; "
                             "0 = closed loop (default)")
    parser.add_argument("--summary-json", default="", help="write a JSON summary here at exit")
    parser.add_argument("--seed", type=int, default=0, help="seed for request lengths and arrivals")
    parser.add_argument("--tokens-per-char", type=float, default=1.0,
                        help="prompt tokens per ASCII character (1.0 for a byte-level tokenizer)")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="socket timeout per request (s)")
    parser.add_argument("--endpoint", default=ROW_NAME, help="completions path (default /v1/completions)")


# ---------------------------------------------------------------------------------------------
# Measurement collection (per Locust process)
# ---------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]; None for no data."""
    if not values:
        return None
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _dist(values_ms: list[float]) -> dict[str, float | int | None]:
    r = _r3

    return {
        "count": len(values_ms),
        "mean": r(sum(values_ms) / len(values_ms)) if values_ms else None,
        "p50": r(percentile(values_ms, 50)),
        "p90": r(percentile(values_ms, 90)),
        "p99": r(percentile(values_ms, 99)),
        "max": r(max(values_ms)) if values_ms else None,
    }


class _Bucket:
    __slots__ = ("tokens", "ok", "rejected", "failed", "ttft", "itl")

    def __init__(self) -> None:
        self.tokens = 0
        self.ok = self.rejected = self.failed = 0
        self.ttft: list[float] = []
        self.itl: list[float] = []


class Collector:
    """Exact samples (ms) and counters of this process, plus a 1-second timeline."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.wall_start = time.time()
        self.t0 = time.perf_counter()
        self.t_stop: float | None = None
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.e2e: list[float] = []
        self.tpot: list[float] = []
        self.by_status: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.ok = self.rejected = self.failed = 0
        self.output_tokens = 0
        self.short_outputs = 0  # ok requests that produced fewer tokens than max_tokens
        self.timeline: dict[int, _Bucket] = {}

    def _bucket(self, t: float) -> _Bucket:
        k = max(0, int(t - self.t0))
        b = self.timeline.get(k)
        if b is None:
            b = self.timeline[k] = _Bucket()
        return b

    def on_text(self, now: float, text: str) -> None:  # streamed tokens, credited as they arrive
        self._bucket(now).tokens += 1

    def record(self, res: StreamResult, max_tokens: int) -> None:
        now = time.perf_counter()
        b = self._bucket(now)
        self.by_status[str(res.status) if res.status else "error"] += 1
        if res.status == 429:
            self.rejected += 1
            b.rejected += 1
            return
        if not res.ok:
            self.failed += 1
            b.failed += 1
            self.errors[_error_text(res)] += 1
            return
        self.ok += 1
        b.ok += 1
        n = res.output_tokens
        self.output_tokens += n
        b.tokens += max(0, n - res.text_chunks)  # multi-token chunks: credit the rest at completion
        if n < max_tokens:
            self.short_outputs += 1
        self.e2e.append(res.e2e * 1000)
        if res.ttft is not None:
            self.ttft.append(res.ttft * 1000)
            b.ttft.append(res.ttft * 1000)
            if n > 1:
                self.tpot.append((res.e2e - res.ttft) * 1000 / (n - 1))
        itl_ms = [x * 1000 for x in res.itls]
        self.itl.extend(itl_ms)
        b.itl.extend(itl_ms)

    def timeline_rows(self) -> list[dict[str, Any]]:
        if not self.timeline:
            return []
        rows = []
        for k in range(0, max(self.timeline) + 1):
            b = self.timeline.get(k) or _Bucket()
            rows.append({
                "t": k,
                "output_tokens": b.tokens,
                "ok": b.ok,
                "rejected_429": b.rejected,
                "failed": b.failed,
                "ttft_p50_ms": _r3(percentile(b.ttft, 50)),
                "ttft_p99_ms": _r3(percentile(b.ttft, 99)),
                "itl_p50_ms": _r3(percentile(b.itl, 50)),
                "itl_p99_ms": _r3(percentile(b.itl, 99)),
            })
        return rows


def _error_text(res: StreamResult) -> str:
    return f"HTTP {res.status}: {res.error}" if res.status else str(res.error)


class _State:
    collector = Collector()
    clock: PoissonClock | None = None
    started = False
    model: str | None = None
    user_ids = itertools.count()


STATE = _State()


def _resolve_model(environment: Any, client: CompletionStreamClient) -> str:
    opts = environment.parsed_options
    if opts.model:
        return opts.model
    if STATE.model is None:
        try:
            status, obj = client.get_json("/v1/models")
            data = obj.get("data") if isinstance(obj, dict) else None
            STATE.model = data[0]["id"] if status == 200 and data else "default"
        except Exception as e:  # noqa: BLE001
            log.warning("GET /v1/models failed (%s); using model 'default'", e)
            STATE.model = "default"
        log.info("model: %s", STATE.model)
    return STATE.model


@events.test_start.add_listener
def _on_test_start(environment: Any, **_: Any) -> None:
    opts = environment.parsed_options
    STATE.collector.reset()
    STATE.started = True
    STATE.clock = None
    if isinstance(environment.runner, MasterRunner) or not opts or opts.rate <= 0:
        return
    seed: Any = opts.seed
    if isinstance(environment.runner, WorkerRunner):  # decorrelate the workers' schedules
        seed = f"{opts.seed}-{environment.runner.client_id}"
    STATE.clock = PoissonClock(opts.rate, seed=seed)


@events.test_stop.add_listener
def _on_test_stop(environment: Any, **_: Any) -> None:
    STATE.collector.t_stop = time.perf_counter()


@events.quitting.add_listener
def _on_quitting(environment: Any, **_: Any) -> None:
    opts = environment.parsed_options
    if not STATE.started or isinstance(environment.runner, WorkerRunner):
        return
    if opts and getattr(opts, "csv_prefix", None):
        _final_csv(environment, opts.csv_prefix)
    summary = build_summary(environment)
    log.info(
        "summary: %d ok, %d rejected (429), %d failed, %d output tokens in %.1fs = %.1f tok/s",
        summary["requests"]["ok"], summary["requests"]["rejected_429"], summary["requests"]["failed"],
        summary["output_tokens"], summary["duration_s"], summary["tokens_per_s"],
    )
    if opts and opts.summary_json:
        d = os.path.dirname(opts.summary_json)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(opts.summary_json, "w") as f:
            json.dump(summary, f, indent=2)
        log.info("summary written to %s", opts.summary_json)


def _final_csv(environment: Any, prefix: str) -> None:
    """Rewrite PREFIX_stats.csv / PREFIX_failures.csv from the final stats.

    Locust's CSV writer greenlet rewrites them only once a second and not at exit, so they can miss
    the requests of the last second; this makes them exact.  (The history file is left alone.)
    """
    from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

    writer = StatsCSV(environment, PERCENTILES_TO_REPORT)
    for suffix, fn in (("_stats.csv", writer.requests_csv), ("_failures.csv", writer.failures_csv)):
        path = prefix + suffix
        try:
            with open(path + ".tmp", "w", newline="") as f:
                fn(csv.writer(f))
            os.replace(path + ".tmp", path)  # the writer greenlet keeps the old (now unlinked) file
        except OSError as e:
            log.warning("could not write %s: %s", path, e)


def build_summary(environment: Any) -> dict[str, Any]:
    """Summary from this process's exact samples, or (on a master) from Locust's merged stats."""
    opts = environment.parsed_options
    col = STATE.collector
    t_end = col.t_stop if col.t_stop is not None else time.perf_counter()
    duration = max(1e-9, t_end - col.t0)
    summary: dict[str, Any] = {
        "workload": opts.workload,
        "model": opts.model or STATE.model,
        "host": environment.host,
        "target_rate_rps": opts.rate if opts.rate > 0 else None,
        "seed": opts.seed,
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(col.wall_start)),
        "duration_s": round(duration, 3),
    }
    if isinstance(environment.runner, MasterRunner):
        st = environment.stats
        e2e, ttft, itl, tpot = (st.get(ROW_NAME, k) for k in ("E2E", "TTFT", "ITL", "TPOT"))
        rej = st.get(REJECTED_NAME, "REJECTED").num_requests
        ok = e2e.num_requests - e2e.num_failures

        def d(entry: Any) -> dict[str, Any]:
            if not entry.num_requests:
                return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
            return {"count": entry.num_requests, "mean": round(entry.avg_response_time, 3),
                    **{f"p{q}": entry.get_response_time_percentile(q / 100) for q in (50, 90, 99)},
                    "max": entry.max_response_time}

        tokens = e2e.total_content_length
        summary.update({
            "source": "locust-stats",
            "requests": {"total": e2e.num_requests + rej, "ok": ok, "rejected_429": rej,
                         "failed": e2e.num_failures, "by_status": {}},
            "errors": {str(e.error): e.occurrences for e in st.errors.values()},
            "output_tokens": tokens,
            "ttft_ms": d(ttft), "itl_ms": d(itl), "e2e_ms": d(e2e), "tpot_ms": d(tpot),
            "timeline": [],
        })
    else:
        clock = STATE.clock
        tokens = col.output_tokens
        ok = col.ok
        summary.update({
            "source": "samples",
            "requests": {"total": col.ok + col.rejected + col.failed, "ok": col.ok,
                         "rejected_429": col.rejected, "failed": col.failed,
                         "by_status": dict(sorted(col.by_status.items()))},
            "errors": dict(col.errors.most_common()),
            "output_tokens": tokens,
            "short_outputs": col.short_outputs,
            "ttft_ms": _dist(col.ttft), "itl_ms": _dist(col.itl),
            "e2e_ms": _dist(col.e2e), "tpot_ms": _dist(col.tpot),
            "arrivals": {
                "mode": "poisson" if clock else "closed-loop",
                "claimed": clock.claimed if clock else None,
                "late": clock.late if clock else None,
                "mean_lag_ms": round(clock.total_lag / clock.late * 1000, 3) if clock and clock.late else 0.0,
            },
            "timeline": col.timeline_rows(),
        })
    total = summary["requests"]["total"]
    summary["tokens_per_s"] = round(tokens / duration, 3)
    summary["requests_per_s"] = round(total / duration, 3)
    summary["ok_requests_per_s"] = round(ok / duration, 3)
    return summary


# ---------------------------------------------------------------------------------------------
# The user
# ---------------------------------------------------------------------------------------------


def _wait_time(user: User) -> float:
    clock = STATE.clock
    return clock.claim(time.perf_counter()) if clock is not None else 0.0


class CompletionUser(User):
    """Sends streaming completions of the chosen workload, one at a time."""

    host = "http://127.0.0.1:8000"  # overridden by --host
    wait_time = _wait_time

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.workload = get_workload(opts.workload)
        self.tokens_per_char = opts.tokens_per_char
        self.endpoint = opts.endpoint
        self.client = CompletionStreamClient(self.host, api_key=opts.api_key or None,
                                             timeout=opts.request_timeout)
        self.rng = random.Random(f"{opts.seed}-{next(STATE.user_ids)}")
        self.model = _resolve_model(self.environment, self.client)
        if STATE.clock is not None:  # the first request also waits for its Poisson slot
            gevent.sleep(STATE.clock.claim(time.perf_counter()))

    def on_stop(self) -> None:
        self.client.close()

    @task
    def completion(self) -> None:
        req = make_request(self.workload, self.rng, model=self.model, tokens_per_char=self.tokens_per_char)
        res = self.client.stream(req.body, path=self.endpoint, on_text=STATE.collector.on_text)
        STATE.collector.record(res, req.output_tokens)
        fire = self.environment.events.request.fire
        ctx = {"workload": self.workload.name, "input_tokens": req.input_tokens, "max_tokens": req.output_tokens}
        if res.status == 429:
            fire(request_type="REJECTED", name=REJECTED_NAME, response_time=res.e2e * 1000,
                 response_length=0, exception=None, context=ctx)
            return
        if not res.ok:
            fire(request_type="E2E", name=ROW_NAME, response_time=res.e2e * 1000, response_length=0,
                 exception=OpenAIError(_error_text(res)), context=ctx)
            return
        n = res.output_tokens
        if res.ttft is not None:
            fire(request_type="TTFT", name=ROW_NAME, response_time=res.ttft * 1000,
                 response_length=1, exception=None, context=ctx)
            for gap in res.itls:
                fire(request_type="ITL", name=ROW_NAME, response_time=gap * 1000, response_length=1,
                     exception=None, context=ctx)
            if n > 1:
                fire(request_type="TPOT", name=ROW_NAME, response_time=(res.e2e - res.ttft) * 1000 / (n - 1),
                     response_length=n, exception=None, context=ctx)
        fire(request_type="E2E", name=ROW_NAME, response_time=res.e2e * 1000, response_length=n,
             exception=None, context=ctx)
