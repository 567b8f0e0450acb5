"""The bench's placement option: config checks, the simulator's view of a placement file, and
one table per attention-thread count in the simulator check (logic only; the end-to-end run
with a planned placement is in test_bench.py)."""
import numpy as np
import pytest

from amoe_serve.bench import sim_check as sc
from amoe_serve.bench.bench_config import load_bench_config
from amoe_serve.bench.bench_placement import sim_placement
from amoe_serve.config import ConfigError, load_config
from amoe_serve.placement.policies import plan
from amoe_serve.placement.trace import Trace


def _trace(B=2, E=4, skew=(60, 20, 15, 5)):
    load = np.array([skew] * B, dtype=np.int64)
    return Trace(B, E, 1, tokens_W=[int(load[0].sum())], load_WBE=[load],
                 trans_WLEE=[np.zeros((B - 1, E, E), dtype=np.int64)])


def test_bench_placement_config_is_checked():
    assert load_bench_config(None, []).placement == "contiguous"
    assert load_bench_config(None, ["placement=greedy"]).placement == "greedy"
    with pytest.raises(ConfigError, match="placement='balanced'"):
        load_bench_config(None, ["placement=balanced"])
    with pytest.raises(ConfigError, match="replica_slots"):
        load_bench_config(None, ["placement=replicate", "replica_slots=-1"])
    with pytest.raises(ConfigError, match="plans its own file"):
        load_bench_config(None, ["placement=greedy", "dataplane=[deployment.placement=/x.json]"])


@pytest.mark.parametrize("policy,slots,expect", [("greedy", None, ("replicate", 0)),
                                                 ("replicate", 2, ("replicate", 1)),
                                                 ("replicate", 4, ("replicate", 1))])
def test_the_simulator_models_a_placement_file_by_its_kind_and_copies(tmp_path, policy, slots, expect):
    t = _trace()
    place, _ = plan(policy, t, 2, replica_slots=slots)
    f = tmp_path / "p.json"
    f.write_text(place.to_json(policy=policy))
    dp = load_config(None, ["deployment.expert_ranks=2", f"deployment.placement={f}"])
    assert sim_placement(dp, 2, 4) == expect
    assert sim_placement(load_config(None, ["deployment.expert_ranks=2"]), 2, 4) == ("contiguous", 0)


def test_sim_check_times_each_systems_attention_at_its_own_threads(tmp_path, monkeypatch):
    """AEP with two waves keeps one linear thread; lockstep (one wave) lends the experts' cores:
    two tables. With an explicit count both share one."""
    calls = []
    monkeypatch.setattr(sc, "calibrate", lambda path, model, attention_threads=1: calls.append(
        (path.name, attention_threads)))
    monkeypatch.setattr("amoe_serve.engine.job.cores_available", lambda: 4)
    monkeypatch.delenv("MPI_LOCALNRANKS", raising=False)
    monkeypatch.delenv("SLURM_NODEID", raising=False)
    dp = load_config(None, ["deployment.attention_ranks=1", "deployment.expert_ranks=2",
                            "scheduler.attention_waves=2"])
    tables = sc.calibrate_tables(dp, "ckpt", tmp_path)
    assert calls == [("local-calibrated.yaml", 1), ("local-calibrated-t4.yaml", 4)]
    assert tables == {"aep": tmp_path / "local-calibrated.yaml", "lockstep": tmp_path / "local-calibrated-t4.yaml"}
    calls.clear()
    dp = load_config(None, ["deployment.expert_ranks=2", "scheduler.attention_waves=1"])
    tables = sc.calibrate_tables(dp, "ckpt", tmp_path)
    assert calls == [("local-calibrated.yaml", 4)] and tables["aep"] == tables["lockstep"]
