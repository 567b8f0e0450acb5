"""The transformers baseline's batch-size sweep: which sizes run, which run wins, and the
config's old single `hf_batch_size` (pure, no timing)."""

import pytest

from amoe_serve.bench.bench_config import load_bench_config
from amoe_serve.bench.hf_baseline import best_run, sweep_sizes
from amoe_serve.bench.run import baseline_top_k, hf_batch_sizes
from amoe_serve.config import ConfigError
from tests.support import REPO


def test_sweep_sizes_are_capped_at_the_request_count():
    assert sweep_sizes([16, 32, 64], 64) == [16, 32, 64]
    assert sweep_sizes([64, 16, 32], 20) == [16, 20]  # 32 and 64 are the same run as 20
    assert sweep_sizes([16, 32, 64], 4) == [4]
    assert sweep_sizes([8], 64) == [8]


def run(b, tokens, wall):
    return {"batch_size": b, "output_tokens": tokens, "wall_s": wall}


def test_best_run_is_the_fastest_and_ties_go_to_the_smaller_batch():
    runs = [run(16, 6400, 100.0), run(32, 6400, 80.0), run(64, 6400, 90.0)]
    assert best_run(runs)["batch_size"] == 32
    assert best_run([run(64, 100, 1.0), run(32, 100, 1.0)])["batch_size"] == 32
    assert best_run([run(16, 100, 0.0), run(32, 100, 2.0)])["batch_size"] == 32
    with pytest.raises(ValueError):
        best_run([])


def test_config_sweep_and_the_old_single_size():
    cfg = load_bench_config(None, [])
    assert hf_batch_sizes(cfg) == [16, 32, 64]
    assert hf_batch_sizes(load_bench_config(None, ["hf_batch_sizes=[8,24]"])) == [8, 24]
    assert hf_batch_sizes(load_bench_config(None, ["hf_batch_size=2"])) == [2]  # backwards compatible
    with pytest.raises(ConfigError):
        load_bench_config(None, ["hf_batch_sizes=[]"])
    for name in ("paper-short", "overhead"):
        cfg = load_bench_config(REPO / "configs" / "bench" / f"{name}.yaml", [])
        assert cfg.hf_batch_size is None and len(hf_batch_sizes(cfg)) >= 2
        assert cfg.slo.itl_p50_ms > 0 and cfg.slo.ttft_p99_ms > 0


class Spec:
    top_k = 2


def test_baselines_run_the_data_planes_top_k():
    cfg = load_bench_config(None, ["routing.mode=exponential", "routing.top_k=1"])
    assert baseline_top_k(cfg, Spec) == 1
    assert baseline_top_k(load_bench_config(None, ["routing.mode=exponential", "routing.top_k=0"]), Spec) is None
    assert baseline_top_k(load_bench_config(None, ["routing.mode=model", "routing.top_k=1"]), Spec) is None
    off = load_bench_config(None, ["routing.mode=exponential", "routing.top_k=1", "baselines_match_top_k=false"])
    assert baseline_top_k(off, Spec) is None
