"""Goodput at a service-level objective, per system, from the bench's point records.

The SLO is the one of vLLM's `bench serve --goodput` (a time-to-first-token and an
inter-token-latency bound), applied to whole load points: a Poisson point meets it when its ITL
p50 and its TTFT p99 are within the bounds and no request failed. A system's goodput is its
output tokens/s at the highest request rate it was run at that meets the SLO; beside it, its
saturation (offline) tokens/s. (vLLM's own --goodput counts the requests of one run that meet
the SLO each; `request_goodput` below is that per-request count, per point.)

Pure functions: no timing, no I/O."""

from __future__ import annotations

from amoe_serve.slo import meets_slo

__all__ = ["meets_slo", "goodput_table", "request_goodput"]


def goodput_table(records: list[dict], itl_p50_ms: float, ttft_p99_ms: float) -> list[dict]:
    """One row per (workload, system) in the records' order: goodput tokens/s (None when no
    Poisson rate was run, 0.0 when none met the SLO), the rate it was measured at, every
    Poisson rate with its verdict, and the saturation (offline) tokens/s."""
    keys: list[tuple[str, str]] = []
    for r in records:
        k = (r["workload"], r["system"])
        if k not in keys:
            keys.append(k)
    rows = []
    for workload, system in keys:
        mine = [r for r in records if r["workload"] == workload and r["system"] == system]
        offline = [r["output_tokens_per_s"] for r in mine if r["request_rate"] == 0]
        poisson = sorted((r for r in mine if r["request_rate"] > 0), key=lambda r: r["request_rate"])
        verdicts = [{"request_rate": r["request_rate"], "meets_slo": meets_slo(r, itl_p50_ms, ttft_p99_ms),
                     "output_tokens_per_s": r["output_tokens_per_s"], "itl_ms_p50": r.get("itl_ms_p50"),
                     "ttft_ms_p99": r.get("ttft_ms_p99")} for r in poisson]
        passing = [v for v in verdicts if v["meets_slo"]]
        best = passing[-1] if passing else None
        sat = max(offline) if offline else None
        good = None if not verdicts else (best["output_tokens_per_s"] if best else 0.0)
        rows.append({"workload": workload, "system": system,
                     "slo": {"itl_p50_ms": itl_p50_ms, "ttft_p99_ms": ttft_p99_ms},
                     "goodput_tokens_per_s": good,
                     "goodput_request_rate": best["request_rate"] if best else None,
                     "saturation_tokens_per_s": sat,
                     "goodput_vs_saturation": good / sat if good is not None and sat else None,
                     "rates": verdicts})
    return rows


def request_goodput(traces, ttft_ms: float, tpot_ms: float, wall_s: float) -> dict:
    """vLLM's per-request goodput for one point: the requests whose TTFT <= ttft_ms and whose
    time per output token after the first, (last - first) / (n - 1), <= tpot_ms, counted and
    per second of the point's wall time."""
    good = 0
    for t in traces:
        if t.error or not t.token_s:
            continue
        ttft = (t.token_s[0] - t.submit_s) * 1e3
        tpot = (t.token_s[-1] - t.token_s[0]) * 1e3 / (len(t.token_s) - 1) if len(t.token_s) > 1 else 0.0
        good += ttft <= ttft_ms and tpot <= tpot_ms
    return {"slo_good_requests": good, "request_goodput_per_s": good / wall_s if wall_s > 0 else None}
