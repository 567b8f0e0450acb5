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
