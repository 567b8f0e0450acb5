"""Cluster simulator: cost model, engine determinism, conservation, lockstep barrier, CLI."""
import json
import math

import numpy as np
import pytest

from amoe_serve.sim.sim_config import SimModelConfig, load_sim_config
from amoe_serve.sim.cost import TABLES, CostModel, DeviceTable, compute_bound_rows, load_table
from amoe_serve.sim.engine import (AepSim, LockstepSim, SimParams, make_workload, makespan,
                                   simulate_aep)
from amoe_serve.sim.run import run_one

MIXTRAL = SimModelConfig()
TINY = SimModelConfig(hidden=256, ffn=512, num_blocks=4, num_experts=4, top_k=2, num_heads=4,
                      num_kv_heads=2, head_dim=64, vocab=300)


def _params(**kw):
    base = dict(num_blocks=4, num_experts=4, top_k=2, max_running=8, max_batch_tokens=512,
                max_expert_batch=512, skew_rate=0.7, seed=3)
    base.update(kw)
    return SimParams(**base)


def test_expert_cost_bandwidth_bound_small_compute_bound_large():
    cm = CostModel(TABLES["a100"], MIXTRAL)
    t1, t8, t2k, t4k = (cm.expert_time([n]) for n in (1, 8, 2048, 4096))
    # small batches read the same weights: nearly flat in rows
    assert t8 < 1.05 * t1
    # large batches are compute-bound: linear in rows
    assert t4k / t2k == pytest.approx(2.0, rel=0.1)
    knee = compute_bound_rows(TABLES["a100"], MIXTRAL)
    assert 100 < knee < 400   # A100 bf16: ~312e12*0.7 / (2e12*0.8) flops/byte -> ~ 140 rows
    # per-row cost falls ~100x from batch 1 to the knee: what re-batching buys
    assert cm.expert_time([1]) / 1 > 50 * cm.expert_time([512]) / 512
    # H100 is faster at both ends
    ch = CostModel(TABLES["h100"], MIXTRAL)
    assert ch.expert_time([1]) < t1 and ch.expert_time([4096]) < t4k


def test_attention_and_transfer_costs_grow():
    cm = CostModel(TABLES["a100"], MIXTRAL)
    assert cm.attention_time(64, 64 * 100) < cm.attention_time(64, 64 * 4000)
    assert cm.attention_time(8, 800) < cm.attention_time(1024, 1024 * 100)
    assert cm.transfer_time(4e6, True) < cm.transfer_time(4e6, False)
    assert cm.transfer_time(0, True) == TABLES["a100"].intra_lat_s


def test_local_table_interpolates_measurements():
    t = DeviceTable(name="x", peak_flops=0, mem_bw=0, memory_bytes=1e9, step_overhead_s=0.0,
                    expert_points=[[1, 1e-3], [64, 2e-3], [128, 4e-3]], attention_fit=[1e-3, 1e-5, 0.0])
    cm = CostModel(t, TINY)
    assert cm.expert_time([64]) == pytest.approx(2e-3)
    assert cm.expert_time([96]) == pytest.approx(3e-3)
    assert cm.expert_time([256]) == pytest.approx(8e-3)      # linear extrapolation
    assert cm.expert_time([1, 64]) == pytest.approx(3e-3)    # reference grouped FFN loops experts
    assert cm.attention_time(10, 0) == pytest.approx(1e-3 + 1e-4)
    assert cm.lm_head_time(64) == t.sampler_s  # no LM head fit: the sampler only
    t.lm_head_fit = [2e-3, 1e-4]
    assert CostModel(t, TINY).lm_head_time(64) == pytest.approx(2e-3 + 64e-4)
    assert CostModel(t, TINY).attention_time(10, 0, lm_rows=64) == pytest.approx(1.1e-3 + 8.4e-3)
    shipped = load_table("local")  # the shipped calibration loads, LM head included
    assert shipped.expert_points and len(shipped.attention_fit) == 3 and len(shipped.lm_head_fit) == 2


def test_same_seed_same_results():
    cm = CostModel(TABLES["a100"], TINY)
    wl = make_workload(60, (5, 20), (5, 30), "poisson", 2000.0, seed=1)
    a = simulate_aep(cm, wl, _params(), 2, 2).summary()
    b = simulate_aep(cm, wl, _params(), 2, 2).summary()
    assert a == b
    c = simulate_aep(cm, wl, _params(seed=4), 2, 2).summary()
    assert c != a


@pytest.mark.parametrize("system", ["aep", "aep-nogate", "aep-w4", "lockstep-colocated", "lockstep-split"])
def test_conservation(system):
    cm = CostModel(TABLES["a100"], TINY)
    wl = make_workload(40, (3, 12), (2, 9), "offline", 1.0, seed=2)
    p = _params()
    if system == "aep-nogate":
        p = _params(attention_waves=1, attention_max_wait_s=0.0)
    elif system == "aep-w4":
        p = _params(attention_waves=4)
    if system.startswith("aep"):
        sim = AepSim(cm, wl, p, 2, 2)
    else:
        sim = LockstepSim(cm, wl, p, 2 if "split" in system else 4, 2 if "split" in system else 4,
                          colocated="colocated" in system)
    st = sim.run()
    assert np.array_equal(st.generated, wl.output)        # every request: exactly its length
    assert st.summary()["requests_done"] == 40
    # every token (prompt as prefill + every decode token but the last) crosses every block k times
    tokens = int(wl.prompt.sum() + (wl.output - 1).sum())
    assert np.all(st.expert_rows.sum(axis=1) == tokens * p.top_k)
    assert st.expert_rows.sum() == tokens * p.top_k * p.num_blocks
    if system.startswith("aep"):   # the wave gate's bookkeeping drains with the work
        for a in sim.attn:
            assert not a.plan.gate.incoming_BW.any() and not a.plan.gate.in_flight_W.any()
            assert a.plan.queues.total() == 0 and not a.pool and not a.wave_of


def test_wave_gate_keeps_attention_batches_whole():
    """The sim's AEP attention ranks run sched.AttentionPlan (WaveGate inside) like the real rank:
    gated, a newly admitted request waits at block 0 for its wave instead of running alone."""
    from amoe_serve.sched.waves import WaveGate
    cm = CostModel(TABLES["a100"], TINY)
    wl = make_workload(64, (3, 12), (20, 40), "offline", 1.0, seed=2)
    base = dict(max_running=8, max_batch_tokens=512)   # requests are admitted as others finish
    off = AepSim(cm, wl, _params(attention_waves=1, attention_max_wait_s=0.0, **base), 2, 2)
    on = AepSim(cm, wl, _params(attention_waves=1, attention_max_wait_s=1.0, **base), 2, 2)
    two = AepSim(cm, wl, _params(attention_waves=2, attention_max_wait_s=1.0, **base), 2, 2)
    assert isinstance(on.attn[0].plan.gate, WaveGate) and two.attn[0].plan.queues.lengths.shape == (4, 2)
    s_off, s_on = off.run().summary(), on.run().summary()
    assert s_on["mean_attention_batch"] > 1.2 * s_off["mean_attention_batch"]
    assert s_on["mean_expert_batch"] > s_off["mean_expert_batch"]
    assert s_on["requests_done"] == s_off["requests_done"] == two.run().summary()["requests_done"] == 64
    # max_wait is a safety valve, not the clock: nothing here should wait out a whole second
    assert s_on["simulated_seconds"] < 0.5


def test_max_wait_releases_a_held_queue():
    """A queue held for a wave that never comes back is released after max_wait (the sim clock)."""
    cm = CostModel(TABLES["a100"], TINY)
    wl = make_workload(2, (2, 2), (3, 3), "offline", 1.0, seed=0)
    sim = AepSim(cm, wl, _params(attention_waves=1, attention_max_wait_s=0.25), 1, 2)
    a = sim.attn[0]
    a.plan.gate.incoming_BW[1, 0] += 1      # a phantom segment of wave 0 that never returns to block 1
    st = sim.run()
    assert st.summary()["requests_done"] == 2
    assert st.summary()["simulated_seconds"] >= 0.25   # block 1 waited out max_wait once


def test_makespan_on_limited_cores():
    assert makespan([1.0, 1.0, 1.0], 2) == 2.0
    assert makespan([1.0, 3.0], 0) == 3.0
    assert makespan([], 2) == 0.0


def test_lockstep_barrier_step_time_matches_formula():
    """All 4 rows go to expert 0 (skew makes expert 1 impossible): step is fully determined."""
    model = SimModelConfig(hidden=128, ffn=256, num_blocks=2, num_experts=2, top_k=1, num_heads=2,
                           num_kv_heads=1, head_dim=64, vocab=10)
    table = DeviceTable(name="hand", peak_flops=0, mem_bw=0, memory_bytes=1e9, step_overhead_s=0.0,
                        expert_points=[[1, 1e-3], [100, 100e-3]], attention_fit=[2e-3, 0.0, 0.0], sampler_s=0.0,
                        intra_bw=math.inf, intra_lat_s=0.5e-3, inter_bw=math.inf, inter_lat_s=0.5e-3)
    cm = CostModel(table, model)
    wl = make_workload(4, (1, 1), (1, 1), "offline", 1.0, seed=0)
    p = SimParams(num_blocks=2, num_experts=2, top_k=1, max_running=2, max_batch_tokens=64,
                  max_expert_batch=64, skew_rate=1e3, hot_per_block=False, seed=0)
    sim = LockstepSim(cm, wl, p, 2, 2, colocated=True)
    st = sim.run()
    hot = int(np.argmax(st.expert_rows.sum(axis=0)))
    assert st.expert_rows[:, hot].tolist() == [4, 4]
    # attention 2 ms (both GPUs) + dispatch 0.5 ms (the cold GPU sends its 2 rows) + hot expert
    # 4 rows = 4 ms + combine 0.5 ms, per block; the barrier makes both GPUs wait for it.
    assert sim.block_times == pytest.approx([7e-3, 7e-3])
    assert st.summary()["simulated_seconds"] == pytest.approx(14e-3)
    assert st.busy.tolist() == pytest.approx([2 * (2e-3 + 4e-3), 2 * 2e-3] if hot == 0 else
                                             [2 * 2e-3, 2 * (2e-3 + 4e-3)])


def test_scheduler_policy_from_sched_changes_batching():
    cfg = load_sim_config("configs/sim/tiny.yaml", ["workload.skew_rate=1.0"])
    a = run_one(cfg, "aep", 8, policy="defrag", max_running=16)
    b = run_one(cfg, "aep", 8, policy="flfs", max_running=16)
    assert a["policy"] == "defrag" and b["policy"] == "flfs"
    assert a["mean_expert_batch"] != b["mean_expert_batch"]
    # the AEP ranks really use amoe_serve.sched classes
    from amoe_serve.sched.policies import FLFS, Defrag
    from amoe_serve.sched.queues import MuQueues
    cm = CostModel(TABLES["a100"], TINY)
    sim = AepSim(cm, make_workload(4, (2, 3), (2, 3), "offline", 1.0, 0), _params(policy="flfs"), 2, 2)
    assert isinstance(sim.attn[0].plan.queues, MuQueues) and isinstance(sim.experts[0].sched, FLFS)
    sim = AepSim(cm, make_workload(4, (2, 3), (2, 3), "offline", 1.0, 0), _params(), 2, 2)
    assert isinstance(sim.experts[0].sched, Defrag)


def test_cores_limit_slows_cpu_runs():
    def tokens_per_s(system: str, cores: int) -> float:
        cfg = load_sim_config("configs/sim/local.yaml", [f"cluster.cores={cores}", "workload.num_requests=8",
                                                          "workload.input_len=[4,8]", "workload.output_len=[4,6]"])
        rec = run_one(cfg, system, 3, max_running=64, policy="defrag")
        assert rec["requests_done"] == 8
        return rec["tokens_per_s"]
    for system in ("aep", "lockstep"):
        assert math.isfinite(tokens_per_s(system, 2))
        assert tokens_per_s(system, 1) < tokens_per_s(system, 3)


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_cli_writes_results_and_plot(tmp_path):
    from amoe_serve.cli import main
    rc = main(["sim", "--config", "configs/sim/tiny.yaml", "--output", str(tmp_path)])
    assert rc == 0
    recs = json.loads((tmp_path / "results.json").read_text())
    need = {"gpus", "attention_gpus", "expert_gpus", "system", "policy", "workload", "request_rate",
            "tokens_per_s", "itl_ms_p50", "itl_ms_p99", "ttft_ms_p50", "ttft_ms_p99", "mean_expert_batch",
            "idle_fraction", "simulated_seconds", "requests_done"}
    assert recs and all(need <= set(r) for r in recs)
    assert {r["gpus"] for r in recs} == {4, 8} and {r["system"] for r in recs} == {"aep", "lockstep"}
    assert (tmp_path / "scaling.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["aep_over_lockstep"]) == {"4", "8"}
    assert {r["attention_waves"] for r in recs if r["system"] == "aep"} == {2}   # real config default
    assert {r["attention_waves"] for r in recs if r["system"] == "lockstep"} == {None}


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_aep_waves_sweep_is_part_of_aep_tuning():
    from amoe_serve.sim.run import run_sim
    cfg = load_sim_config("configs/sim/tiny.yaml", ["cluster.gpus=[4]", "run.aep_waves=[1,2,4]",
                                                    "run.systems=[aep]"])
    assert cfg.run.attention_waves == 2 and cfg.run.attention_max_wait_ms == 1000.0
    recs, summary = run_sim(cfg, log=lambda *_: None)
    assert sorted(r["attention_waves"] for r in recs) == [1, 2, 4]
    best = max(recs, key=lambda r: r["tokens_per_s"])
    assert summary["best"][0]["attention_waves"] == best["attention_waves"]
    from amoe_serve.config import ConfigError
    with pytest.raises(ConfigError):
        load_sim_config("configs/sim/tiny.yaml", ["run.aep_waves=[0]"])


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_cli_poisson_sweep_plot(tmp_path):
    from amoe_serve.cli import main
    rc = main(["sim", "--config", "configs/sim/tiny.yaml", "--output", str(tmp_path), "cluster.gpus=[4]",
               "workload.arrival=poisson", "workload.request_rates=[200,2000]"])
    assert rc == 0
    recs = json.loads((tmp_path / "results.json").read_text())
    assert len({r["request_rate"] for r in recs}) == 2
    assert (tmp_path / "itl_vs_throughput.png").is_file()
