"""`amoe-serve bench` end to end on a tiny model: all three systems, offline and Poisson, the
records' fields, the plots. (Timings are never asserted: the machine is shared and noisy.)"""

import json

import pytest

from amoe_serve.bench.workloads import WORKLOADS, make_requests
from amoe_serve.engine.skew import ExponentialSkew
from tests.support import run_cli

FIELDS = {"system", "workload", "request_rate", "output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50",
          "itl_ms_p99", "mean_expert_batch", "idle_fraction", "roofline_fraction"}


def test_workloads_follow_the_paper_and_are_seeded():
    reqs = make_requests("medium", 500, 4.0, 300, seed=1)
    (ilo, ihi), (olo, ohi) = WORKLOADS["medium"]
    assert all(ilo <= len(r.prompt_token_ids) <= ihi and olo <= r.max_tokens <= ohi for r in reqs)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(reqs, reqs[1:])]
    assert 0.2 < sum(gaps) / len(gaps) < 0.3  # Poisson at 4 req/s: mean gap 0.25 s
    assert make_requests("medium", 5, 4.0, 300, seed=1) == reqs[:5]
    assert all(r.arrival_s == 0 for r in make_requests("short", 5, 0.0, 300, seed=1))


def test_exponential_skew_matches_its_distribution():
    skew = ExponentialSkew(num_blocks=3, num_experts=6, top_k=2, rate=0.7, seed=0)
    import torch
    ids, w = skew.route(1, 6000, torch.float32, "cpu")
    assert ids.shape == (6000, 2) and bool((ids[:, 0] != ids[:, 1]).all()) and torch.allclose(w, torch.full_like(w, 0.5))
    first = torch.bincount(ids[:, 0], minlength=6).float() / 6000
    assert torch.allclose(first, skew.probabilities(1), atol=0.03)
    assert not torch.equal(skew.p_BE[0], skew.p_BE[1])  # the hot expert moves between blocks


@pytest.mark.mpi(ranks=4)
def test_bench_command_writes_records_and_plots(tmp_path):
    out = tmp_path / "out"
    p = run_cli(["bench", "--output", str(out), "model.hidden_size=64", "model.intermediate_size=96",
                 "model.num_blocks=2", "model.num_heads=4", "model.head_dim=16", "model.num_kv_heads=2",
                 "model.vocab_size=300", "num_requests=4", "request_rates=[0.0,4.0]", "hf_batch_size=2",
                 "sim_check=true", "placement=greedy", "placement_trace_requests=4"],
                env_extra={"AMOE_SERVE_CACHE": str(tmp_path / "cache")}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    recs = doc["records"]
    # vllm is among the default systems: skipped here (no .venv-vllm, or no head_dim 16 kernel), with why
    assert [s["system"] for s in doc["skipped"]] == ["vllm"]
    # aep and lockstep at both rates; transformers offline only
    assert sorted((r["system"], r["request_rate"]) for r in recs) == [
        ("aep", 0.0), ("aep", 4.0), ("hf-transformers", 0.0), ("lockstep", 0.0), ("lockstep", 4.0)]
    for r in recs:
        assert FIELDS <= set(r)
        assert r["output_tokens_per_s"] > 0 and 0 < r["roofline_fraction"] < 1
        if r["system"] != "hf-transformers":
            assert r["failed_requests"] == 0
            assert r["itl_ms_p50"] > 0 and r["mean_expert_batch"] >= 1 and 0 <= r["idle_fraction"] <= 1
    # AEP and lockstep served with the greedy placement planned on a trace of held-out requests
    from amoe_serve.placement.layout import Placement
    assert {r["placement"] for r in recs if r["system"] in ("aep", "lockstep")} == {"greedy"}
    assert (out / "placement-trace.json").is_file()
    assert Placement.from_file(out / "placement-greedy.json", 2, 8, 2).pairs_of(0)
    assert "Expert placement of AEP and lockstep: greedy" in (out / "results.md").read_text()
    n_out = {r["output_tokens"] for r in recs if r["request_rate"] == 0.0}
    assert len(n_out) == 1  # every system produced the same number of tokens
    assert (out / "bench.png").stat().st_size > 10_000
    assert "| short |" in (out / "results.md").read_text()
    # goodput at the SLO: every system that ran, with its saturation tokens/s beside it
    good = {g["system"]: g for g in doc["goodput"]}
    assert set(good) == {"aep", "lockstep", "hf-transformers"} and doc["slo"]["itl_p50_ms"] > 0
    for system in ("aep", "lockstep"):
        assert [v["request_rate"] for v in good[system]["rates"]] == [4.0]
        assert good[system]["saturation_tokens_per_s"] > 0 and good[system]["goodput_tokens_per_s"] is not None
    assert good["hf-transformers"]["goodput_tokens_per_s"] is None
    (hf,) = [r for r in recs if r["system"] == "hf-transformers"]
    assert hf["hf_batch_size"] == 2 and [s["batch_size"] for s in hf["hf_sweep"]] == [2]
    assert "Goodput at the SLO" in (out / "results.md").read_text()
    # The simulator, calibrated in the same run, predicted the offline AEP/lockstep ratio.
    checks = {c["kind"]: c for c in json.loads((out / "sim_check.json").read_text())}
    assert set(checks) == {"saturation", "goodput"}
    check = checks["saturation"]
    measured = {r["system"]: r["output_tokens_per_s"] for r in recs if r["request_rate"] == 0.0}
    assert check["measured_aep_vs_lockstep"] == pytest.approx(measured["aep"] / measured["lockstep"])
    assert check["predicted_aep_vs_lockstep"] > 0 and (out / "local-calibrated.yaml").is_file()
    assert "Simulator check" in (out / "results.md").read_text()
    # ... and the goodput of both at the bench's SLO, replaying the 4 req/s point's arrivals
    g = checks["goodput"]
    assert g["rates"] == [4.0] and {p["system"] for p in g["points"]} == {"aep", "lockstep"}
    assert {s: v["tokens_per_s"] for s, v in g["measured_goodput"].items()} == \
        {s: good[s]["goodput_tokens_per_s"] for s in ("aep", "lockstep")}
    assert all(p["predicted"]["output_tokens_per_s"] > 0 for p in g["points"])
    assert "Simulator check, goodput" in (out / "results.md").read_text()
