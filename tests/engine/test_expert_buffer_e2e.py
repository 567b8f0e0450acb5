"""Expert Buffering never changes results: greedy outputs with S = 1 and 2 resident experts per
expert rank equal `local` mode's (everything resident) token for token, through in-process
ranks in AEP and lockstep; the ranks report hit rates."""

import pytest

from amoe_serve.config import load_config
from amoe_serve.engine.inproc import run_inproc
from amoe_serve.engine.local import LocalEngine
from amoe_serve.model import load_spec
from amoe_serve.requests_io import GenerateRequest
from amoe_serve.sampler import SamplingParams
from tests.support import MAX_NEW, PROMPTS


def _requests():
    return [GenerateRequest(f"r{i}", p, SamplingParams(max_tokens=MAX_NEW)) for i, p in enumerate(PROMPTS)]


def _outputs(results):
    return [results[f"r{i}"].output_token_ids for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def local_outputs(checkpoints):
    cfg = load_config(overrides=[f"model.path={checkpoints['mixtral']}", "deployment.mode=local"])
    return _outputs(LocalEngine(cfg, load_spec(cfg.model.path)).generate(_requests()))


@pytest.mark.parametrize("mode", ["aep", "lockstep"])
@pytest.mark.parametrize("slots,eviction", [(1, "lifo"), (2, "lru"), (2, "fifo")])
def test_buffered_ranks_match_local(mode, slots, eviction, checkpoints, local_outputs):
    cfg = load_config(overrides=[f"model.path={checkpoints['mixtral']}", f"deployment.mode={mode}",
                                 "deployment.attention_ranks=1", "deployment.expert_ranks=2",
                                 f"expert_buffer.slots={slots}", f"expert_buffer.eviction={eviction}"])
    results, stats = run_inproc(cfg, _requests(), timeout=120)
    assert _outputs(results) == local_outputs
    ranks = [s for s in stats.values() if s["role"] == "expert"]
    assert len(ranks) == 2
    for r in ranks:
        b = r["expert_buffer"]
        assert b["slots"] == slots and b["eviction"] == eviction and b["held"] == 9
        # 9 experts each over 3 blocks: misses are unavoidable with 1-2 slots.
        assert b["misses"] > 0 and b["hit_rate"] < 1
        assert b["hits"] + b["misses"] == r["total_batches"]   # one lookup per expert run


def test_buffered_local_mode_matches(checkpoints, local_outputs):
    cfg = load_config(overrides=[f"model.path={checkpoints['mixtral']}", "deployment.mode=local",
                                 "expert_buffer.slots=1"])
    eng = LocalEngine(cfg, load_spec(cfg.model.path))
    assert _outputs(eng.generate(_requests())) == local_outputs
    assert eng.experts.counters.to_dict()["expert_buffer"]["misses"] > 0
