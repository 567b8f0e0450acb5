"""Goodput headline, noise, replicas and the GPU calibration's CPU-safe parts."""
import json
import subprocess

import numpy as np
import pytest

from amoe_serve.sim.sim_config import load_sim_config


def test_goodput_cli_writes_headline_records(tmp_path):
    from amoe_serve.cli import main
    rc = main(["sim", "--config", "configs/sim/goodput-tiny.yaml", "--output", str(tmp_path), "cluster.gpus=[4]",
               "run.replicas=[1]", "run.aep_attention_fractions=[0.5]", "run.aep_waves=[1]"])
    assert rc == 0
    head = json.loads((tmp_path / "results.json").read_text())
    points = json.loads((tmp_path / "points.json").read_text())
    need = {"gpus", "system", "tpot_slo_ms", "goodput_tok_s_per_gpu", "saturation_tok_s_per_gpu", "best"}
    assert head and all(need <= set(h) for h in head)
    assert {(h["system"], h["tpot_slo_ms"]) for h in head} == {(s, t) for s in ("aep", "lockstep") for t in (1.0, 3.0)}
    for h in head:  # goodput is the best point meeting the SLO, recomputed from every point
        mine = [p for p in points if p["system"] == h["system"]]
        ok = [p["tokens_per_s_per_gpu"] for p in mine
              if p["itl_ms_p50"] <= h["tpot_slo_ms"] and p["ttft_admitted_ms_p99"] <= 50.0]
        assert h["goodput_tok_s_per_gpu"] == pytest.approx(max(ok) if ok else 0.0)
        assert h["goodput_tok_s_per_gpu"] <= h["saturation_tok_s_per_gpu"] + 1e-9
        if h["best"]:
            assert {"split", "replicas", "waves", "limit"} <= set(h["best"])
    assert "aep_over_lockstep" in json.loads((tmp_path / "summary.json").read_text())


def test_noise_has_mean_one_and_lockstep_pays_the_slowest_rank():
    from amoe_serve.sim.noise import Noise, NoiseConfig
    n = Noise(NoiseConfig(cv=0.05), 4)
    x = np.array([n.scale(0, 1.0) for _ in range(20000)])
    assert x.mean() == pytest.approx(1.0, abs=0.003) and x.std() == pytest.approx(0.05, rel=0.05)
    slow = Noise(NoiseConfig(cv=0.0, slow_gpus=[2], slow_factor=0.2), 4)
    assert slow.scale(2, 1.0) == pytest.approx(1.2) and slow.scale(1, 1.0) == 1.0

    from amoe_serve.sim.run import run_one
    cfg = load_sim_config("configs/sim/tiny.yaml", ["cluster.gpus=[4]", "model.top_k=1"])
    quiet = run_one(cfg, "lockstep", 4, max_running=16)
    cfg.noise.cv = 0.3
    noisy = run_one(cfg, "lockstep", 4, max_running=16)
    # The barrier waits for the max of 4 noisy ranks, so the mean step grows with the noise.
    assert noisy["itl_ms_p50"] > 1.03 * quiet["itl_ms_p50"]


def test_eplb_replicas_balance_more_ranks_than_experts():
    from amoe_serve.sim.placement import make_placement
    from amoe_serve.sim.workload import popularity
    p_BE = popularity(8, 0.5, 4, True, 0)
    for R, rep in ((48, 0), (64, 1), (4, 1)):
        pl = make_placement("replicate", p_BE, R, rep)
        pl.validate(4, 8)
        n_BE, _ = pl.replica_tables()
        for b in range(4):
            load = np.zeros(R)
            for e in range(8):
                for r in pl.ranks_of(b, e):
                    load[r] += p_BE[b, e] / n_BE[b, e]
            assert (load > 0).all() and load.max() / load.mean() < 1.15
    worst = make_placement("contiguous", p_BE, 4)
    n_BE, _ = worst.replica_tables()
    assert (n_BE == 1).all()


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_gpu_calibrate_cpu_safe_parts(tmp_path):
    from amoe_serve.sim.cost import load_table
    from amoe_serve.sim.calibrate import write_table
    from amoe_serve.sim.gpu_calibrate import gpu_slug, main, table_from
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_slug("NVIDIA H200") == "h200"
    t = table_from({"expert_points": [[1, 1e-4], [64, 2e-4]], "attention_fit": [1e-4, 1e-6, 1e-9],
                    "lm_head_fit": [1e-4, 1e-6], "op_cv": 0.031}, "h200")
    write_table(t, tmp_path / "h200-calibrated.yaml")
    back = load_table(str(tmp_path / "h200-calibrated.yaml"))
    assert back.op_cv == pytest.approx(0.031) and back.memory_bytes == 141e9 and back.expert_points
    assert main(["--dry-run", "--gpu-name", "NVIDIA H100 80GB HBM3"]) == 0
    p = subprocess.run(["bash", "scripts/gpu-calibrate.sh", "--dry-run"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "gpu_calibrate --out configs/sim/" in p.stdout and "amoe_kernels.bench" in p.stdout
    assert "tests/kernels/test_gpu.py" in p.stdout


def test_ablation_rows_and_each_sweep_contains_the_row_it_extends(tmp_path):
    """The ablation table at CI size: every mechanism row at both noise levels and both SLOs;
    '+ split ratio' sweeps a superset of '+ replicas' (the configured split is among its
    fractions), so its goodput can only be at least that row's at every SLO."""
    from amoe_serve.sim.ablation import ablation, ablation_markdown
    from amoe_serve.sim.goodput import with_overrides
    cfg = load_sim_config("configs/sim/goodput-tiny.yaml", [
        "run.aep_max_running=[4,16]", "run.lockstep_max_running=[4,16]", "run.aep_waves=[1,2]",
        "run.replicas=[0,1]", "run.aep_attention_fractions=[0.25,0.5]", "goodput.ablation_gpus=4"])
    cfg = with_overrides(cfg, cluster={"attention_fraction": 0.5})
    rows = ablation(cfg, log=lambda *a, **k: None)
    names = ["lockstep", "μ-queues alone", "+ micro-waves", "+ micro-waves, MTFS", "+ micro-waves, FLFS",
             "+ replicas", "+ split ratio", "lockstep, no host cost", "+ split ratio, no host cost"]
    got = {(r["row"], r["noise_cv"], r["tpot_slo_ms"]) for r in rows}
    assert got == {(n, cv, s) for n in names for cv in (0.0, 0.05) for s in (1.0, 3.0)}
    by = {(r["row"], r["noise_cv"], r["tpot_slo_ms"]): r for r in rows}
    for cv in (0.0, 0.05):
        for s in (1.0, 3.0):
            assert by[("+ split ratio", cv, s)]["goodput_tok_s_per_gpu"] >= \
                by[("+ replicas", cv, s)]["goodput_tok_s_per_gpu"] - 1e-9
        assert by[("lockstep", cv, 1.0)]["saturation_tok_s_per_gpu"] > 0
    md = ablation_markdown(rows)
    assert md.count("\n") == len(names) + 2 and "+ split ratio" in md
