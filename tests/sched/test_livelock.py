"""Policy behaviour on the deterministic toy pipeline (tests.sched.toy_pipeline)."""
import pytest

from amoe_serve.sched.policies import make_scheduler
from tests.sched.toy_pipeline import ToyPipeline

NB = 8
STEPS = 500


def steady(t):
    return [(0, 1)]  # one new token at block 0 every step


def test_flfs_livelocks_under_steady_arrivals():
    p = ToyPipeline(NB, make_scheduler("flfs"))
    for t in range(STEPS):
        block = p.step(steady(t))
        assert block == 0  # block 0 always has work, so FLFS never looks further
    assert p.stats.completed_tokens == 0
    assert p.queues.lengths[1, 0] == STEPS  # everything piles up at block 1
    assert p.queues.lengths[2:].sum() == 0


@pytest.mark.parametrize("policy", ["defrag", "mtfs"])
def test_defrag_and_mtfs_make_progress(policy):
    s = ToyPipeline(NB, make_scheduler(policy)).run(STEPS, steady)
    # Throughput must keep up with arrivals (bounded backlog), not just be non-zero.
    assert s.completed_tokens > STEPS * 0.9
    assert s.idle_steps == 0


def _two_waves(policy):
    # A big wave (8 tokens) at block 2 and a smaller one (5) one block behind it.
    p = ToyPipeline(NB, make_scheduler(policy))
    p.push(2, 8)
    p.push(1, 5)
    return p.drain()


def test_mtfs_leaves_orphan_wave_defrag_merges():
    mtfs, defrag = _two_waves("mtfs"), _two_waves("defrag")
    assert mtfs.completed_tokens == defrag.completed_tokens == 13
    # MTFS chases the bigger wave to the end; the 5-token wave then runs alone.
    assert mtfs.batch_sizes == [8] * 6 + [5] * 7
    # Defrag advances the trailing wave first so it lands on the 8 and they run as one.
    assert defrag.batch_sizes == [5] + [13] * 6
    assert defrag.mean_batch > mtfs.mean_batch


def test_defrag_larger_mean_batch_on_repeated_waves():
    # The two-wave pattern repeats every 20 steps (e.g. tokens returning from
    # different attention ranks at different depths).
    def waves(t):
        return [(2, 8), (1, 5)] if t % 20 == 0 else []

    stats = {}
    for policy in ("mtfs", "defrag"):
        p = ToyPipeline(NB, make_scheduler(policy))
        p.run(400, waves)
        stats[policy] = p.drain()
    assert stats["mtfs"].completed_tokens == stats["defrag"].completed_tokens == 20 * 13
    assert stats["defrag"].mean_batch > 1.5 * stats["mtfs"].mean_batch
    # Fewer executed batches for the same work = fewer kernel launches / weight reads.
    assert len(stats["defrag"].batch_sizes) < len(stats["mtfs"].batch_sizes)


def test_closed_loop_reenters_block_zero():
    p = ToyPipeline(3, make_scheduler("mtfs"), closed_loop=True)
    p.push(0, 2)
    s = p.drain(max_steps=9)
    assert s.completed_tokens == 6 and p.queues.lengths[0, 0] == 2
