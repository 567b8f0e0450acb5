"""Plot a Locust run of loadtests/locustfile.py into one PNG.

    python -m loadtests.plot --csv out/short --output out/short.png [--summary-json out/short.json]

Reads ``PREFIX_stats.csv`` (final per-row statistics) and ``PREFIX_stats_history.csv`` (one line
per row and second).  Per-row history (TTFT/ITL/E2E over time) needs ``--csv-full-history`` on the
locust command line; without it, and when ``--summary-json`` is given, the per-second timeline of
the summary JSON is used instead.  Panels: TTFT and ITL percentiles over time, output tokens/s over
time, requests/s (completed, rejected 429) with the user count, failures, and the final TTFT / ITL /
TPOT / E2E percentiles annotated with the summary's tokens/s and request counts.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import defaultdict
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROW_NAME = "/v1/completions"
LAT_TYPES = ("TTFT", "ITL", "TPOT", "E2E")


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if v == v else None  # NaN -> None


def read_stats(path: str) -> dict[str, dict[str, Any]]:
    """``PREFIX_stats.csv`` rows keyed by Type (``Aggregated`` for the total row)."""
    rows: dict[str, dict[str, Any]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            key = r.get("Type") or r.get("Name") or ""
            if r.get("Name") == "Aggregated" and not r.get("Type"):
                key = "Aggregated"
            rows[key] = r
    return rows


def read_history(path: str) -> tuple[dict[str, list[dict[str, Any]]], float | None]:
    """``PREFIX_stats_history.csv`` rows grouped by Type ("Aggregated" for the total); t0."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    t0 = None
    if not os.path.exists(path):
        return groups, None
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            ts = _num(r.get("Timestamp"))
            if ts is None:
                continue
            t0 = ts if t0 is None else min(t0, ts)
            key = "Aggregated" if (r.get("Name") == "Aggregated" and not r.get("Type")) else (r.get("Type") or "")
            groups[key].append(r)
    if t0 is not None:
        for rows in groups.values():
            for r in rows:
                r["_t"] = _num(r["Timestamp"]) - t0
    return groups, t0


def _series(rows: list[dict[str, Any]], col: str) -> tuple[list[float], list[float | None]]:
    return [r["_t"] for r in rows], [_num(r.get(col)) for r in rows]


def _has_data(ys: list[float | None]) -> bool:
    return any(y is not None for y in ys)


def _no_data(ax: Any, msg: str) -> None:
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="gray")


def _latency_panel(ax: Any, kind: str, hist: dict[str, list], timeline: list[dict]) -> None:
    """Per-second p50/p99 from the summary timeline (exact) if given, else Locust's history
    (percentiles over Locust's sliding window, whole ms; needs --csv-full-history)."""
    ax.set_title(f"{kind} over time")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("ms")
    drawn = False
    key = kind.lower()
    for q, style in (("p50", "-"), ("p99", ":")):
        pts = [(r["t"], r.get(f"{key}_{q}_ms")) for r in timeline if r.get(f"{key}_{q}_ms") is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=".", label=f"{q} (per second)")
            drawn = True
    if not drawn and hist.get(kind):
        for col, style in (("50%", "-"), ("90%", "--"), ("99%", ":")):
            xs, ys = _series(hist[kind], col)
            # Locust reports 0 until its window has data: drop those leading points.
            while ys and not ys[0]:
                xs, ys = xs[1:], ys[1:]
            if _has_data(ys):
                ax.plot(xs, ys, style, label=f"p{col[:-1]} (locust window)")
                drawn = True
    if drawn:
        ax.legend(fontsize=8)
        ax.set_ylim(bottom=0)
    else:
        _no_data(ax, f"no {kind} history\n(use --csv-full-history or --summary-json)")


def make_plot(csv_prefix: str, output: str, summary_path: str | None = None, title: str | None = None) -> str:
    stats_path = f"{csv_prefix}_stats.csv"
    stats = read_stats(stats_path) if os.path.exists(stats_path) else {}
    hist, _ = read_history(f"{csv_prefix}_stats_history.csv")
    summary: dict[str, Any] = {}
    if summary_path and os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    timeline = summary.get("timeline") or []

    fig, axes = plt.subplots(3, 2, figsize=(13, 12))
    head = title or f"AMoE-serve load test: {os.path.basename(csv_prefix)}"
    if summary:
        req = summary.get("requests", {})
        head += (f"  |  workload={summary.get('workload')}  rate={summary.get('target_rate_rps')}  "
                 f"{summary.get('tokens_per_s', 0):.1f} output tok/s over {summary.get('duration_s', 0):.0f}s  |  "
                 f"ok={req.get('ok')} rejected(429)={req.get('rejected_429')} failed={req.get('failed')}")
    fig.suptitle(head, fontsize=10)

    _latency_panel(axes[0][0], "TTFT", hist, timeline)
    _latency_panel(axes[0][1], "ITL", hist, timeline)

    # Output token throughput.
    ax = axes[1][0]
    ax.set_title("output tokens/s over time")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("tokens/s")
    if timeline:
        xs = [r["t"] for r in timeline]
        ys = [r["output_tokens"] for r in timeline]
        ax.plot(xs, ys, alpha=0.5, label="per second")
        w = 5
        roll = [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]
        ax.plot(xs, roll, label=f"{w}s mean")
        if summary.get("tokens_per_s") is not None:
            ax.axhline(summary["tokens_per_s"], color="k", ls="--", lw=0.8,
                       label=f"overall {summary['tokens_per_s']:.1f} tok/s")
        ax.legend(fontsize=8)
    elif hist.get("TTFT") or hist.get("ITL"):
        # Each TTFT/ITL sample is one text chunk ~ one token: chunks/s approximates tokens/s.
        by_t: dict[float, float] = defaultdict(float)
        for kind in ("TTFT", "ITL"):
            for r in hist.get(kind, []):
                by_t[r["_t"]] += _num(r.get("Requests/s")) or 0.0
        xs = sorted(by_t)
        ax.plot(xs, [by_t[x] for x in xs], label="text chunks/s (TTFT+ITL rows)")
        ax.legend(fontsize=8)
    else:
        _no_data(ax, "no per-row history / summary timeline")

    # Requests/s and users.
    ax = axes[1][1]
    ax.set_title("requests/s")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("req/s")
    drawn = False
    if timeline:
        xs = [r["t"] for r in timeline]
        ax.plot(xs, [r["ok"] for r in timeline], label="completed ok (per second)")
        ax.plot(xs, [r["rejected_429"] for r in timeline], label="rejected 429 (per second)")
        drawn = True
    else:
        for kind, label in (("E2E", "completed (E2E rows)"), ("REJECTED", "rejected 429")):
            if hist.get(kind):
                xs, ys = _series(hist[kind], "Requests/s")
                ax.plot(xs, [y or 0 for y in ys], label=label)
                drawn = True
    if summary.get("target_rate_rps"):
        ax.axhline(summary["target_rate_rps"], color="k", ls="--", lw=0.8, label="target rate")
    agg = hist.get("Aggregated") or []
    if agg:
        ax2 = ax.twinx()
        xs, ys = _series(agg, "User Count")
        ax2.plot(xs, ys, color="gray", lw=0.8, alpha=0.6)
        ax2.set_ylabel("users", color="gray")
        if not drawn:
            xs, ys = _series(agg, "Requests/s")
            ax.plot(xs, [y or 0 for y in ys], label="all rows (aggregated)")
            drawn = True
    if drawn:
        ax.legend(fontsize=8, loc="upper left")
    else:
        _no_data(ax, "no history")

    # Failures.
    ax = axes[2][0]
    ax.set_title("failures")
    ax.set_xlabel("time (s)")
    rows = hist.get("E2E") or hist.get("Aggregated") or []
    if timeline:
        xs = [r["t"] for r in timeline]
        ax.bar(xs, [r["failed"] for r in timeline], width=0.8, color="tab:red", alpha=0.6, label="failed / s")
        ax.set_ylabel("failures / s")
        ax.set_ylim(bottom=0, top=max(1, max(r["failed"] for r in timeline) * 1.1))
        ax.legend(fontsize=8, loc="upper left")
    if rows:
        xs, ys = _series(rows, "Total Failure Count")
        ax2 = ax.twinx() if timeline else ax
        ax2.plot(xs, [y or 0 for y in ys], color="darkred", label="cumulative failures")
        ax2.set_ylabel("cumulative failures")
        ax2.set_ylim(bottom=0, top=max(1.0, max((y or 0) for y in ys) * 1.1))
        ax2.legend(fontsize=8, loc="upper right")
    if not timeline and not rows:
        _no_data(ax, "no history")
    total_fail = _num((stats.get("E2E") or {}).get("Failure Count"))
    if total_fail is not None:
        ax.set_title(f"failures (total {int(total_fail)})")

    # Final percentiles.
    ax = axes[2][1]
    ax.set_title("final latency percentiles (ms)")
    kinds = [k for k in LAT_TYPES if k in stats and (_num(stats[k].get("Request Count")) or 0) > 0]
    if kinds:
        cols = ("50%", "90%", "99%")
        width = 0.8 / len(cols)
        for i, col in enumerate(cols):
            vals = [_num(stats[k].get(col)) or 0 for k in kinds]
            ax.bar([j + (i - 1) * width for j in range(len(kinds))], vals, width=width, label=f"p{col[:-1]}")
        ax.set_xticks(range(len(kinds)))
        ax.set_xticklabels([f"{k}\n(n={int(_num(stats[k]['Request Count']) or 0)})" for k in kinds])
        if max((_num(stats[k].get("99%")) or 0) for k in kinds) > 0:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        _no_data(ax, f"no latency rows in {stats_path}")
    if summary:
        t = summary.get("ttft_ms", {})
        i = summary.get("itl_ms", {})
        text = (f"tokens/s: {summary.get('tokens_per_s', 0):.1f}\n"
                f"output tokens: {summary.get('output_tokens')}\n"
                f"TTFT p50/p99: {t.get('p50')}/{t.get('p99')} ms\n"
                f"ITL p50/p99: {i.get('p50')}/{i.get('p99')} ms")
        ax.text(0.02, 0.98, text, transform=ax.transAxes, va="top", fontsize=8,
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})

    fig.tight_layout(rect=(0, 0, 1, 0.97))
    d = os.path.dirname(output)
    if d:
        os.makedirs(d, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", required=True, metavar="PREFIX", help="the --csv PREFIX given to locust")
    p.add_argument("--output", "-o", default=None, help="PNG path (default PREFIX.png)")
    p.add_argument("--summary-json", default=None, help="the --summary-json file of the same run")
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    if not os.path.exists(f"{a.csv}_stats.csv") and not os.path.exists(f"{a.csv}_stats_history.csv"):
        print(f"error: neither {a.csv}_stats.csv nor {a.csv}_stats_history.csv exists", file=sys.stderr)
        return 2
    out = make_plot(a.csv, a.output or f"{a.csv}.png", a.summary_json, a.title)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
