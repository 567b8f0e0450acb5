"""Calibration of the local device table with the ranks' own code, and the bench's simulator
check wiring (the simulator sees the bench's deployment, limits, skew and exact requests)."""
import numpy as np

from amoe_serve.bench.sim_check import sim_config_for
from amoe_serve.bench.workloads import make_requests
from amoe_serve.config import load_config
from amoe_serve.model import load_spec
from amoe_serve.sim.calibrate import calibrate
from amoe_serve.sim.cost import CostModel, load_table
from amoe_serve.sim.engine import Workload
from amoe_serve.sim.run import run_one


def test_calibration_times_the_rank_code_and_feeds_the_simulator(checkpoints, tmp_path):
    ckpt = str(checkpoints["mixtral"])
    out = tmp_path / "local.yaml"
    t = calibrate(out, ckpt, quick=True, cores=2)
    table = load_table(str(out))  # the written file loads back as the same table
    assert table.expert_points == t.expert_points and table.lm_head_fit == t.lm_head_fit and table.cores == 2
    rows = [n for n, _ in t.expert_points]
    assert rows == sorted(rows) and all(s > 0 for _, s in t.expert_points)
    assert len(t.attention_fit) == 3 and len(t.lm_head_fit) == 2
    assert all(c >= 0 for c in t.attention_fit + t.lm_head_fit)
    assert sum(t.attention_fit) > 0 and sum(t.lm_head_fit) > 0  # something was timed

    spec = load_spec(ckpt)
    dp = load_config(None, [f"model.path={ckpt}", "routing.mode=exponential", "routing.rate=0.5",
                            "routing.top_k=1", "engine.max_running_requests=8", "scheduler.attention_waves=2"])
    cfg = sim_config_for(dp, spec, "short", 6, out, cores=2)
    assert (cfg.model.hidden, cfg.model.num_blocks, cfg.model.top_k) == (spec.hidden_size, spec.num_blocks, 1)
    assert cfg.cluster.gpus == [3] and cfg.run.lockstep_layout == "split" and cfg.run.attention_waves == 2
    reqs = make_requests("short", 6, 0.0, spec.vocab_size, seed=0)
    wl = Workload(np.zeros(6), np.array([len(r.prompt_token_ids) for r in reqs]), np.array([r.max_tokens for r in reqs]))
    cost = CostModel(table, cfg.model)
    assert cost.lm_head_time(8) > 0
    for system in ("aep", "lockstep"):
        rec = run_one(cfg, system, 3, policy="defrag", max_running=8, workload=wl)
        assert rec["requests_done"] == 6 and rec["output_tokens"] == sum(r.max_tokens for r in reqs)
        assert rec["tokens_per_s"] > 0


def test_sim_check_models_an_uneven_expert_split(checkpoints, tmp_path):
    """Experts that do not split evenly over the expert ranks (the data plane's contiguous split
    gives some ranks one more) are simulated with the same placement, not refused."""
    from amoe_serve.bench.sim_check import sim_check
    ckpt = str(checkpoints["mixtral"])
    spec = load_spec(ckpt)
    uneven = next(x for x in range(2, spec.num_experts) if spec.num_experts % x)
    dp = load_config(None, [f"model.path={ckpt}", "routing.mode=exponential", "routing.top_k=1",
                            f"deployment.expert_ranks={uneven}"])
    reqs = make_requests("short", 2, 0.0, spec.vocab_size, seed=0)
    recs = [{"system": s, "workload": "short", "request_rate": 0.0, "num_requests": 2, "output_tokens_per_s": v}
            for s, v in (("aep", 2.0), ("lockstep", 1.0))]
    (check,) = sim_check(recs, dp, spec, ckpt, tmp_path, {"short": reqs})
    assert "error" not in check and check["predicted_tokens_per_s"]["aep"] > 0


def test_calibrate_cli_rejects_a_folder_without_a_checkpoint(tmp_path, capsys):
    from amoe_serve.cli import main
    rc = main(["sim", "--calibrate", str(tmp_path / "t.yaml"), "--model", str(tmp_path)])
    assert rc == 2 and "config.json missing" in capsys.readouterr().err
    assert not (tmp_path / "t.yaml").exists()


def test_goodput_check_replays_the_bench_arrivals_and_applies_the_bench_slo(checkpoints, tmp_path):
    """The goodput check simulates each Poisson point on the bench's own requests and arrival
    times and applies the bench's SLO rule to both sides: a loose SLO passes every point (goodput
    = tokens/s at the highest rate), an impossible one none (no ratio to compare)."""
    from amoe_serve.bench.goodput import goodput_table
    from amoe_serve.bench.sim_check import goodput_check
    ckpt = str(checkpoints["mixtral"])
    table = tmp_path / "local.yaml"
    calibrate(table, ckpt, quick=True, cores=2)
    spec = load_spec(ckpt)
    dp = load_config(None, [f"model.path={ckpt}", "routing.mode=exponential", "routing.top_k=1"])
    reqs = {rate: make_requests("short", 4, rate, spec.vocab_size, seed=0) for rate in (2.0, 8.0)}
    assert reqs[2.0][-1].arrival_s > 0
    # measured: AEP meets the SLO at both rates, lockstep only at the lower one
    recs = [{"system": s, "workload": "short", "request_rate": rate, "output_tokens_per_s": tps,
             "itl_ms_p50": itl, "ttft_ms_p99": 100.0, "failed_requests": 0}
            for s, rate, tps, itl in (("aep", 2.0, 10.0, 40.0), ("aep", 8.0, 30.0, 90.0),
                                      ("lockstep", 2.0, 9.0, 50.0), ("lockstep", 8.0, 25.0, 150.0))]
    tables = {"aep": table, "lockstep": table}
    c = goodput_check(recs, dp, spec, tables, 2, "short", reqs, (100.0, 2000.0))
    want = {g["system"]: g["goodput_tokens_per_s"] for g in goodput_table(recs, 100.0, 2000.0)}
    assert {s: v["tokens_per_s"] for s, v in c["measured_goodput"].items()} == want == {"aep": 30.0, "lockstep": 9.0}
    assert c["measured_aep_vs_lockstep"] == 30.0 / 9.0 and c["rates"] == [2.0, 8.0] and len(c["points"]) == 4

    loose = goodput_check(recs, dp, spec, tables, 2, "short", reqs, (1e9, 1e9))
    top = {p["system"]: p["predicted"]["output_tokens_per_s"] for p in loose["points"] if p["request_rate"] == 8.0}
    assert all(p["predicted_meets_slo"] and p["predicted"]["itl_ms_p50"] > 0 for p in loose["points"])
    assert {s: v["tokens_per_s"] for s, v in loose["predicted_goodput"].items()} == top
    assert loose["predicted_aep_vs_lockstep"] == top["aep"] / top["lockstep"]
    assert loose["ratio_error"] == abs(loose["predicted_aep_vs_lockstep"] / loose["measured_aep_vs_lockstep"] - 1)

    none = goodput_check(recs, dp, spec, tables, 2, "short", reqs, (1e-6, 1e-6))
    assert none["predicted_goodput"]["aep"]["tokens_per_s"] == 0.0 and none["predicted_aep_vs_lockstep"] is None
    assert none["measured_aep_vs_lockstep"] is None and none["ratio_error"] is None and none["verdicts_agree"] == 4
