"""The service-level objective of vLLM's `bench serve --goodput` (a time-to-first-token and an
inter-token-latency bound), applied to whole load points. One verdict shared by the bench
(`bench/goodput.py`) and the simulator (`sim/goodput.py`). Pure: no timing, no I/O."""

from __future__ import annotations


def meets_slo(rec: dict, itl_p50_ms: float, ttft_p99_ms: float) -> bool:
    """One Poisson point against the SLO; a point without latencies (offline-only systems) or
    with a failed request never meets it."""
    itl, ttft = rec.get("itl_ms_p50"), rec.get("ttft_ms_p99")
    if itl is None or ttft is None or rec.get("failed_requests"):
        return False
    return itl <= itl_p50_ms and ttft <= ttft_p99_ms
