"""Soak test: sustained load above saturation, with memory and KV checks.

    python -m loadtests.soak --minutes 10 --output out/soak/soak.json            # starts its own stack
    python -m loadtests.soak --duration 60 --host http://127.0.0.1:8000 --pid PID ...  # a running one

Runs the Locust workload (default: medium, open-loop Poisson arrivals above what the stack
can serve, so some requests get 429), and meanwhile samples the resident memory (RSS) of every
process of the stack (the `amoe-serve up` process with pid `--pid` and all its descendants:
Ray's daemons and workers, the Serve proxy and ingress replicas, mpiexec, the gateway and every
rank) once a second. After the load stops it waits for the data plane to go idle and reads the
KV blocks still in use from `/metrics`.

Verdict (exit code 0 = pass, 1 = fail; everything is written to the JSON file):
- no failed request: HTTP 429 is back-pressure and allowed; any other status, a transport
  error or a stream cut short is a failure;
- memory flat after warm-up: for every serving process (gateway, ranks, ingress replicas, the
  Serve proxy) alive for the whole run, the mean RSS of the last quarter of the run is at most
  `--rss-tolerance` (relative) or `--rss-slack-mb` (absolute), whichever is larger, above the
  mean of the second quarter (other processes are reported, not judged);
- KV blocks in use return to 0 and no request is left running or waiting.

Without `--host` the soak starts `amoe-serve up` itself (`--config FILE` and `KEY=VALUE`
overrides are passed on; the default model on a free port) and stops it with SIGTERM at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import httpx

from amoe_serve.config import load_config
from amoe_serve.procs import descendants, kill_group, stop_tree
from amoe_serve.serving.attach import free_port

REPO = Path(__file__).resolve().parents[1]
SERVING_ROLES = ("gateway", "rank", "ingress", "proxy")  # judged for flat memory


# ------------------------------------------------------------------------------- processes

def _rss_kb(pid: int) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None  # a zombie has no VmRSS


def _environ(pid: int) -> dict[bytes, bytes]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split(b"=", 1) for kv in raw.split(b"\0") if b"=" in kv)


def describe(pid: int, root: int) -> tuple[str, str]:
    """(role, label) of one process of the stack: role is one of gateway, rank, ingress, proxy,
    mpi, ray, driver, other; label names it for the report."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "other", f"gone[{pid}]"
    if pid == root:
        return "driver", "amoe-serve up"
    first = cmd.split(" ", 1)[0] if cmd else "?"
    base = os.path.basename(first)
    if base in ("mpiexec", "mpiexec.hydra", "hydra_pmi_proxy"):
        return "mpi", base
    if "amoe_serve.engine.rank_main" in cmd:
        rank = _environ(pid).get(b"PMI_RANK", b"?").decode()
        cfg = re.search(r"--config \S*/([^/\s]+)\.yaml", cmd)
        model = cfg.group(1) if cfg else "?"
        return ("gateway", f"{model}/gateway") if rank == "0" else ("rank", f"{model}/rank{rank}")
    if "ServeReplica" in cmd:
        m = re.search(r"ServeReplica:(\S+)", cmd)
        return "ingress", f"replica {m.group(1) if m else ''}".strip()
    if "ProxyActor" in cmd:
        return "proxy", "serve proxy"
    if cmd.startswith("ray::"):
        return "ray", cmd.split(" ", 1)[0]
    if "ray" in cmd:
        name = next((os.path.basename(t) for t in cmd.split() if "ray" in t), base)
        return "ray", name[:60]
    return "other", base[:60]


class RssSampler(threading.Thread):
    """Samples RSS (MiB) of the root and all its descendants every `interval` seconds."""

    def __init__(self, root: int, interval: float = 1.0):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.t0 = time.monotonic()
        self.samples: dict[int, list[tuple[float, float]]] = {}
        self.info: dict[int, tuple[str, str]] = {}
        self._halt = threading.Event()

    def sample(self) -> None:
        t = time.monotonic() - self.t0
        for pid in [self.root, *descendants(self.root)]:
            kb = _rss_kb(pid)
            if kb is None:
                continue
            if pid not in self.info:
                self.info[pid] = describe(pid, self.root)
            self.samples.setdefault(pid, []).append((t, kb / 1024.0))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def _mean(xs: list[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def rss_report(sampler: RssSampler, warmup_s: float, end_s: float, tolerance: float,
               slack_mb: float) -> tuple[dict, list[str]]:
    """Per process: RSS before (first sample after warm-up) and after (last), second- and
    last-quarter means of the measured window; returns (report, problems)."""
    report, problems = {}, []
    span = max(1e-9, end_s - warmup_s)
    q = [warmup_s + span * k / 4 for k in range(5)]
    for pid, pts in sorted(sampler.samples.items()):
        role, label = sampler.info[pid]
        win = [(t, v) for t, v in pts if warmup_s <= t <= end_s]
        whole = bool(pts) and pts[0][0] <= warmup_s + 2 * sampler.interval and pts[-1][0] >= end_s - 2 * sampler.interval
        q2 = _mean([v for t, v in win if q[1] <= t < q[2]])
        q4 = _mean([v for t, v in win if q[3] <= t <= q[4]])
        entry = {"pid": pid, "role": role, "label": label, "samples": len(pts),
                 "rss_mb_start": round(pts[0][1], 1), "rss_mb_before": round(win[0][1], 1) if win else None,
                 "rss_mb_after": round(win[-1][1], 1) if win else None, "rss_mb_max": round(max(v for _, v in pts), 1),
                 "q2_mean_mb": None if q2 is None else round(q2, 1), "q4_mean_mb": None if q4 is None else round(q4, 1),
                 "alive_whole_run": whole, "judged": whole and role in SERVING_ROLES}
        if entry["judged"]:  # the curve, about 40 points, to tell a leak from a plateau
            step = max(1, len(pts) // 40)
            entry["series_mb"] = [[round(t, 1), round(v, 1)] for t, v in pts[::step]]
        if q2 is not None and q4 is not None:
            growth = q4 - q2
            allowed = max(tolerance * q2, slack_mb)
            entry.update(growth_mb=round(growth, 1), allowed_growth_mb=round(allowed, 1), flat=growth <= allowed)
            if entry["judged"] and growth > allowed:
                problems.append(f"RSS of {label} (pid {pid}) grew {growth:.1f} MiB from the second to the last "
                                f"quarter ({q2:.1f} -> {q4:.1f} MiB; allowed {allowed:.1f})")
        report[f"{label} [{pid}]"] = entry
    return report, problems


# ------------------------------------------------------------------------------- metrics

_SAMPLE = re.compile(r'^(amoe_gateway_\w+)\{([^}]*)\} ([0-9.eE+-]+)$')


def gateway_metrics(base: str, timeout: float = 30) -> dict:
    """{"kv_free": {(model, rank): n}, "running": {model: n}, "waiting": {model: n}} from /metrics."""
    out: dict = {"kv_free": {}, "running": {}, "waiting": {}}
    text = httpx.get(f"{base}/metrics", timeout=timeout).text
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))), float(m.group(3))
        if name == "amoe_gateway_kv_free_blocks":
            out["kv_free"][(labels.get("model"), labels.get("rank"))] = value
        elif name == "amoe_gateway_running_requests":
            out["running"][labels.get("model")] = value
        elif name == "amoe_gateway_waiting_requests":
            out["waiting"][labels.get("model")] = value
    return out


def kv_in_use(baseline: dict, now: dict) -> dict[str, float]:
    return {f"{m}/rank{r}": baseline[(m, r)] - now["kv_free"].get((m, r), 0.0) for (m, r) in baseline}


# ------------------------------------------------------------------------------- the stack

def start_stack(config: Optional[str], overrides: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    cmd = [sys.executable, "-m", "amoe_serve.cli", "up", *(["--config", config] if config else []),
           f"serving.port={port}", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    prefix = load_config(config, overrides).serving.route_prefix.rstrip("/")
    base = f"http://127.0.0.1:{port}{prefix}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"amoe-serve up exited early (see {log})")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_tree(proc, 120)
    raise RuntimeError(f"the stack was not healthy within 300 s (see {log})")


# ------------------------------------------------------------------------------- the soak

def run_locust(args, base: str, out_dir: Path) -> tuple[int, dict, str]:
    locust = Path(sys.executable).parent / "locust"
    summary = out_dir / "locust.json"
    cmd = [str(locust) if locust.exists() else "locust", "-f", str(REPO / "loadtests" / "locustfile.py"),
           "--headless", "-u", str(args.users), "-r", str(args.users), "-t", f"{int(args.duration)}s",
           "--host", base, "--workload", args.workload, "--rate", str(args.rate), "--seed", str(args.seed),
           "--summary-json", str(summary), "--only-summary", "--request-timeout", "120",
           "--csv", str(out_dir / "locust")]
    if args.model:
        cmd += ["--model", args.model]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=args.duration + 180)
    except subprocess.TimeoutExpired:
        kill_group(p, grace=0)
        out, _ = p.communicate()
    except BaseException:  # Ctrl-C: no Locust left behind
        kill_group(p, grace=0)
        p.wait()
        raise
    data = json.loads(summary.read_text()) if summary.exists() else {}
    return p.returncode, data, out


def soak(args) -> dict:
    out_path = Path(args.output)
    out_dir = out_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    own: Optional[subprocess.Popen] = None
    base, root = args.host, args.pid
    if base is None:
        # A bounded ingress queue, so that load above saturation is answered 429 (the user's
        # overrides come later and win).
        own, base = start_stack(args.config, ["serving.max_concurrent_requests=16", *args.overrides],
                                out_dir / "up.log")
        root = own.pid
    base = base.rstrip("/")
    try:
        baseline = gateway_metrics(base)["kv_free"]
        if args.kv_blocks:
            baseline = {k: float(args.kv_blocks) for k in baseline}
        sampler = RssSampler(root, args.interval) if root else None
        if sampler:
            sampler.sample()
            sampler.start()
        t_load = time.monotonic()
        rc, summary, locust_out = run_locust(args, base, out_dir)
        load_s = time.monotonic() - t_load
        if sampler:
            sampler.stop()
        # after the load: the data plane must go idle and give every KV block back
        t_idle = time.monotonic()
        deadline = t_idle + args.idle_timeout
        while True:
            m = gateway_metrics(base)
            used = kv_in_use(baseline, m)
            busy = sum(m["running"].values()) + sum(m["waiting"].values())
            if (busy == 0 and not any(used.values())) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        idle_after_s = time.monotonic() - t_idle
    finally:
        if own is not None:
            stop_tree(own, 120)

    reqs = summary.get("requests", {})
    by_status = reqs.get("by_status", {})
    failures = {s: n for s, n in by_status.items() if s not in ("200", "429")}
    problems = []
    if not summary:
        problems.append(f"Locust wrote no summary (exit code {rc}): {locust_out[-1500:]}")
    if reqs.get("failed", 0) or failures:
        problems.append(f"{reqs.get('failed', 0)} failed request(s): by status {failures}, "
                        f"errors {summary.get('errors', {})}")
    if reqs.get("ok", 0) == 0:
        problems.append("no request succeeded")
    warmup = args.warmup if args.warmup is not None else max(10.0, 0.1 * args.duration)
    rss, rss_problems = (rss_report(sampler, warmup, load_s, args.rss_tolerance, args.rss_slack_mb)
                         if sampler else ({}, []))
    problems += rss_problems
    if any(used.values()) or busy:
        problems.append(f"after the load: KV blocks in use {used}, running+waiting requests {busy:g} "
                        f"(waited {idle_after_s:.0f} s)")
    result = {
        "passed": not problems,
        "problems": problems,
        "host": base,
        "workload": args.workload, "users": args.users, "target_rate_rps": args.rate,
        "duration_s": round(summary.get("duration_s", load_s), 1), "warmup_s": warmup,
        "requests": {"total": reqs.get("total", 0), "served_ok": reqs.get("ok", 0),
                     "rejected_429": reqs.get("rejected_429", 0), "failed": reqs.get("failed", 0),
                     "by_status": by_status, "failures_by_status": failures},
        "errors": summary.get("errors", {}),
        "output_tokens": summary.get("output_tokens"), "tokens_per_s": summary.get("tokens_per_s"),
        "ttft_ms": summary.get("ttft_ms"), "e2e_ms": summary.get("e2e_ms"),
        "locust_exit_code": rc,
        "kv_blocks_in_use_end": used, "requests_running_or_waiting_end": busy,
        "seconds_to_idle_after_load": round(idle_after_s, 1),
        "rss": rss,
    }
    out_path.write_text(json.dumps(result, indent=2))
    return result


def print_result(r: dict) -> None:
    q = r["requests"]
    print(f"[soak] {r['duration_s']} s of '{r['workload']}' at {r['target_rate_rps']} req/s, {r['users']} users: "
          f"{q['served_ok']} served, {q['rejected_429']} rejected (429), {q['failed']} failed "
          f"{q['failures_by_status'] or ''}; {r['output_tokens']} tokens ({r['tokens_per_s']} tok/s)")
    for name, e in r["rss"].items():
        if e["role"] in SERVING_ROLES or e.get("flat") is False:
            print(f"[soak]   RSS {name:<40} {e['rss_mb_before']} -> {e['rss_mb_after']} MiB "
                  f"(q2 {e['q2_mean_mb']}, q4 {e['q4_mean_mb']}){'' if e['judged'] else ' (not judged)'}")
    print(f"[soak] KV blocks in use at the end: {r['kv_blocks_in_use_end']}; "
          f"running+waiting: {r['requests_running_or_waiting_end']:g}")
    print(f"[soak] {'PASS' if r['passed'] else 'FAIL: ' + '; '.join(r['problems'])}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.split("\n\n")[0])
    d = ap.add_mutually_exclusive_group()
    d.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    d.add_argument("--minutes", type=float, help="minutes of load (instead of --duration)")
    ap.add_argument("--host", help="URL of a running stack (default: start `amoe-serve up` here)")
    ap.add_argument("--pid", type=int, help="with --host: pid of its `amoe-serve up` process (for RSS)")
    ap.add_argument("--config", help="without --host: config file of the stack to start")
    ap.add_argument("--workload", default="medium", choices=["short", "medium", "reasonable"])
    ap.add_argument("--users", type=int, default=24, help="Locust users (default 24)")
    ap.add_argument("--rate", type=float, default=6.0,
                    help="Poisson arrival rate, req/s (default 6: above what 2 cores serve)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""))
    ap.add_argument("--warmup", type=float, help="seconds not judged for memory (default max(10, 10%%))")
    ap.add_argument("--interval", type=float, default=1.0, help="RSS sampling interval, s")
    ap.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed relative RSS growth")
    ap.add_argument("--rss-slack-mb", type=float, default=32.0, help="allowed absolute RSS growth, MiB")
    ap.add_argument("--kv-blocks", type=int, default=0,
                    help="KV blocks per attention rank (default: the free count before the load)")
    ap.add_argument("--idle-timeout", type=float, default=60.0,
                    help="seconds to wait after the load for the data plane to go idle")
    ap.add_argument("--output", default="out/soak/soak.json")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides of the stack it starts")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.minutes is not None:
        args.duration = args.minutes * 60
    if args.host and args.overrides:
        raise SystemExit("KEY=VALUE overrides only apply to a stack the soak starts (no --host)")
    r = soak(args)
    print_result(r)
    print(f"[soak] result: {args.output}")
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
