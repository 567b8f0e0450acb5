"""Goodput at an SLO: the selection over Poisson points (pure, no timing), vLLM's per-request
count, and the tables."""

import pytest

from amoe_serve.bench.driver import RequestTrace
from amoe_serve.bench.goodput import goodput_table, meets_slo, request_goodput
from amoe_serve.bench.report import goodput_md


def rec(system, rate, tps, itl=None, ttft99=None, failed=0, workload="short"):
    return {"system": system, "workload": workload, "request_rate": rate, "output_tokens_per_s": tps,
            "itl_ms_p50": itl, "ttft_ms_p99": ttft99, "failed_requests": failed}


SLO = (250.0, 2000.0)


def test_meets_slo_needs_both_bounds_and_no_failure():
    assert meets_slo(rec("aep", 1.0, 50, itl=250.0, ttft99=2000.0), *SLO)  # bounds are inclusive
    assert not meets_slo(rec("aep", 1.0, 50, itl=250.1, ttft99=100.0), *SLO)
    assert not meets_slo(rec("aep", 1.0, 50, itl=100.0, ttft99=2000.1), *SLO)
    assert not meets_slo(rec("aep", 1.0, 50, itl=100.0, ttft99=100.0, failed=1), *SLO)
    assert not meets_slo(rec("hf-transformers", 0.0, 50), *SLO)  # no latencies


def test_goodput_is_the_highest_rate_that_meets_the_slo():
    records = [rec("aep", 0.0, 120.0, itl=400, ttft99=6000),  # offline: saturation, never a goodput point
               rec("aep", 0.5, 49.0, itl=180, ttft99=900),
               rec("aep", 2.0, 95.0, itl=240, ttft99=1900),
               rec("aep", 1.0, 80.0, itl=200, ttft99=1200),   # rates need not come in order
               rec("aep", 4.0, 110.0, itl=380, ttft99=5000),  # over the SLO
               rec("lockstep", 0.0, 115.0, itl=420, ttft99=5000),
               rec("lockstep", 0.5, 49.0, itl=175, ttft99=950),
               rec("lockstep", 1.0, 78.0, itl=260, ttft99=1500),
               rec("lockstep", 2.0, 90.0, itl=245, ttft99=1800)]  # a noisy higher rate that passes: taken
    rows = {g["system"]: g for g in goodput_table(records, *SLO)}
    a = rows["aep"]
    assert (a["goodput_tokens_per_s"], a["goodput_request_rate"], a["saturation_tokens_per_s"]) == (95.0, 2.0, 120.0)
    assert a["goodput_vs_saturation"] == pytest.approx(95 / 120)
    assert [(v["request_rate"], v["meets_slo"]) for v in a["rates"]] == [(0.5, True), (1.0, True), (2.0, True),
                                                                           (4.0, False)]
    assert rows["lockstep"]["goodput_request_rate"] == 2.0
    assert a["slo"] == {"itl_p50_ms": 250.0, "ttft_p99_ms": 2000.0}


def test_goodput_when_nothing_passes_or_no_poisson_rate_ran():
    records = [rec("vllm", 0.0, 300.0, itl=30, ttft99=900), rec("vllm", 8.0, 250.0, itl=300, ttft99=100),
               rec("hf-transformers", 0.0, 60.0),
               rec("aep", 1.0, 40.0, itl=100, ttft99=100, workload="medium")]
    rows = {(g["workload"], g["system"]): g for g in goodput_table(records, *SLO)}
    assert rows[("short", "vllm")]["goodput_tokens_per_s"] == 0.0  # ran, none met the SLO
    assert rows[("short", "vllm")]["goodput_request_rate"] is None
    hf = rows[("short", "hf-transformers")]
    assert hf["goodput_tokens_per_s"] is None and hf["saturation_tokens_per_s"] == 60.0  # offline only
    med = rows[("medium", "aep")]
    assert med["goodput_tokens_per_s"] == 40.0 and med["saturation_tokens_per_s"] is None
    assert [k for k in rows] == [("short", "vllm"), ("short", "hf-transformers"), ("medium", "aep")]
    md = goodput_md(list(rows.values()), {"itl_p50_ms": 250.0, "ttft_p99_ms": 2000.0})
    assert "ITL p50 <= 250 ms and TTFT p99 <= 2000 ms" in md
    assert "| short | hf-transformers | - (no Poisson rate run) | - | 60.0 |" in md
    assert "| short | vllm | 0.0 | - | 300.0 | 0.00 | 8 no |" in md


def test_request_goodput_counts_requests_within_ttft_and_tpot():
    ok = RequestTrace(0.0, [0.5, 0.6, 0.7])          # TTFT 500 ms, TPOT 100 ms
    slow_first = RequestTrace(0.0, [2.5, 2.6])       # TTFT 2500 ms
    slow_rest = RequestTrace(1.0, [1.1, 1.5, 1.9])   # TPOT 400 ms
    one = RequestTrace(0.0, [0.1])                   # one token: no TPOT to miss
    failed = RequestTrace(0.0, [0.1, 0.2], error="boom")
    g = request_goodput([ok, slow_first, slow_rest, one, failed, RequestTrace(0.0)], 2000.0, 250.0, wall_s=4.0)
    assert g == {"slo_good_requests": 2, "request_goodput_per_s": 0.5}
