"""Expert Buffering: eviction policies, and the buffered store equals the resident ExpertSide
bit for bit whatever the number of slots (fp32, bf16, fused layout)."""

import pytest
import torch

from amoe_serve.model import load_spec
from amoe_serve.model.expert_buffer import (BufferedExpertSide, FIFOEviction, LIFOEviction, LRUEviction,
                                            make_eviction, pick_victim)
from amoe_serve.model.expert_side import ExpertSide
from tests.model.hf_factory import write_fused_experts

A, B, C, D = (0, 0), (0, 1), (1, 0), (1, 1)


def _loaded(policy, *keys):
    for k in keys:
        policy.loaded(k)
    return policy


def test_policy_order():
    assert _loaded(LIFOEviction(), A, B, C).victim([A, B, C]) == C      # last loaded
    assert _loaded(FIFOEviction(), A, B, C).victim([A, B, C]) == A      # first loaded
    lru = _loaded(LRUEviction(), A, B, C)
    lru.used(A)
    assert lru.victim([A, B, C]) == B                                   # least recently used
    lifo = _loaded(LIFOEviction(), A, B, C)
    lifo.used(A)                                                        # use does not reorder LIFO/FIFO
    assert lifo.victim([A, B]) == B
    fifo = _loaded(FIFOEviction(), A, B, C)
    fifo.used(A)
    assert fifo.victim([A, B, C]) == A
    lifo.dropped(C)
    lifo.loaded(C)
    assert lifo.victim([A, B, C]) == C
    with pytest.raises(ValueError, match="eviction"):
        make_eviction("mru")


def test_victim_never_kept_and_prefers_inactive():
    p = _loaded(LIFOEviction(), A, B, C, D)
    assert pick_victim(p, [A, B, C, D], keep={D}) == C
    assert pick_victim(p, [A, B, C, D], keep={D}, active={C, B}) == A       # inactive first
    assert pick_victim(p, [A, B, C, D], keep={D, A}, active={B, C}) == C    # all active: policy among them
    assert pick_victim(p, [A, B], keep={A, B}) is None
    f = _loaded(FIFOEviction(), A, B, C, D)
    assert pick_victim(f, [A, B, C, D], keep={A}, active={B}) == C


@pytest.fixture(scope="module")
def mixtral(checkpoints):
    return checkpoints("mixtral")


def _random_calls(spec, pairs, n, seed):
    g = torch.Generator().manual_seed(seed)
    blocks = sorted({b for b, _ in pairs})
    calls = []
    for _ in range(n):
        b = blocks[int(torch.randint(len(blocks), (1,), generator=g))]
        held = [e for bb, e in pairs if bb == b]
        k = int(torch.randint(1, len(held) + 1, (1,), generator=g))
        experts = [held[i] for i in torch.randperm(len(held), generator=g)[:k].tolist()]
        counts = [int(c) for c in torch.randint(0, 5, (k,), generator=g)]
        counts[0] += 1
        calls.append((b, experts, counts))
    return calls


def _compare(path, pairs, slots, eviction="lifo", dtype=None, calls=24, prefetch=True):
    spec = load_spec(path)
    ref = ExpertSide.load(path, spec, dtype, pairs)
    buf = BufferedExpertSide.load(path, spec, dtype, pairs, slots, eviction, prefetch=prefetch)
    assert buf.dtype == ref.dtype
    g = torch.Generator().manual_seed(slots)
    for i, (b, experts, counts) in enumerate(_random_calls(spec, pairs, calls, seed=slots)):
        y = torch.randn(sum(counts), spec.hidden_size, generator=g).to(ref.dtype)
        upcoming = [p for p in pairs if p[0] != b][:i % 4]   # exercise background prefetch too
        got = buf.run_grouped(b, experts, counts, y, upcoming=upcoming)
        want = ref.run_grouped(b, experts, counts, y)
        assert torch.equal(got, want), (slots, b, experts, counts)
    e0 = pairs[0]
    assert torch.equal(buf.run(*e0, y[:3]), ref.run(*e0, y[:3]))
    buf.close()
    return buf.stats()


@pytest.mark.parametrize("slots", [1, 2, 100])
@pytest.mark.parametrize("eviction", ["lifo", "lru", "fifo"])
def test_buffered_equals_resident_fp32(mixtral, slots, eviction):
    pairs = [(b, e) for b in range(3) for e in range(6) if (b + e) % 2 == 0]   # 9 of 18, odd ranks' share
    st = _compare(mixtral, pairs, slots, eviction)
    assert st["slots"] == min(slots, len(pairs))
    if slots >= len(pairs):
        assert st["hit_rate"] == 1.0 and st["misses"] == 0 and st["loads"] == 0 and st["evictions"] == 0
    else:
        assert st["misses"] > 0 and 0 < st["hit_rate"] < 1
        assert st["loads"] == st["misses"] + st["prefetches"] and st["evictions"] >= st["misses"]


@pytest.fixture(scope="module")
def bf16_olmoe(tmp_path_factory):
    from hf_factory import make_checkpoint

    return make_checkpoint("olmoe", tmp_path_factory.mktemp("bf16"), seed=3, dtype=torch.bfloat16)


@pytest.mark.parametrize("slots", [1, 2, 18])
def test_buffered_equals_resident_bf16(bf16_olmoe, slots):
    pairs = [(b, e) for b in range(3) for e in range(6)]
    st = _compare(bf16_olmoe, pairs, slots, "lifo")
    assert (st["misses"] == 0) == (slots >= len(pairs))
    _compare(bf16_olmoe, pairs[:7], slots, "lru", dtype=torch.float32, calls=8)   # cast on load, as ExpertSide


def test_fused_layout(mixtral, tmp_path):
    """transformers-v5 fused experts (gate_up_proj [E, 2F, D], down_proj [E, D, F])."""
    out = write_fused_experts(mixtral, tmp_path / "fused", moe="block_sparse_moe")
    pairs = [(b, e) for b in range(3) for e in range(6)]
    st = _compare(out, pairs, 2, "fifo", calls=12)
    assert st["misses"] > 0


def test_eviction_in_the_store(mixtral):
    """LIFO evicts the expert loaded last, FIFO the first, LRU the least recently used; the
    experts of the running group are never evicted."""
    spec = load_spec(mixtral)
    pairs = [(0, e) for e in range(6)]
    y = torch.randn(2, spec.hidden_size)
    resident = {}
    for ev in ("lifo", "fifo", "lru"):
        buf = BufferedExpertSide.load(mixtral, spec, None, pairs, 3, ev, prefetch=False)
        assert sorted(buf.resident()) == [(0, 0), (0, 1), (0, 2)]   # warm start: first S
        buf.run_grouped(0, [0], [2], y)                               # hit; refreshes (0, 0) for LRU
        buf.run_grouped(0, [3], [2], y)                               # miss: evicts one of 0..2
        resident[ev] = sorted(buf.resident())
        # Two misses in one group: neither may evict the other, nor the group's resident expert.
        buf.run_grouped(0, [4, 5, 3], [1, 1, 0], y)
        assert sorted(buf.resident()) == [(0, 3), (0, 4), (0, 5)]
        st = buf.stats()
        assert (st["hits"], st["misses"]) == (2, 3)
    assert resident["lifo"] == [(0, 0), (0, 1), (0, 3)]   # (0, 2) was loaded last
    assert resident["fifo"] == [(0, 1), (0, 2), (0, 3)]   # (0, 0) was loaded first
    assert resident["lru"] == [(0, 0), (0, 2), (0, 3)]    # (0, 1) was used least recently


def test_prefetch_only_evicts_inactive(mixtral):
    spec = load_spec(mixtral)
    pairs = [(0, e) for e in range(6)]
    y = torch.randn(3, spec.hidden_size)
    ref = ExpertSide.load(mixtral, spec, None, pairs)
    buf = BufferedExpertSide.load(mixtral, spec, None, pairs, 3, "lifo")
    # Running (0, 0) with (0, 4) and (0, 1) queued next: (0, 4) loads into the slot of an expert
    # with nothing queued ((0, 2)), never over (0, 1).
    out = buf.run_grouped(0, [0], [3], y, upcoming=[(0, 4), (0, 1)])
    assert torch.equal(out, ref.run(0, 0, y))
    assert buf.prefetches == 1
    assert sorted(buf.resident()) == [(0, 0), (0, 1), (0, 4)]
    assert torch.equal(buf.run(0, 4, y), ref.run(0, 4, y))
    assert buf.misses == 0 and buf.hits == 2   # the prefetched expert was a hit
    # Nothing inactive to evict: no prefetch.
    assert buf.prefetch([(0, 5)], keep=[(0, 0)], active=[(0, 1), (0, 4)]) == 0
    with pytest.raises(ValueError, match="not held"):
        buf.run(1, 0, y)
    buf.close()


def test_replay_matches_the_store_and_belady_bounds(mixtral):
    """The offline replay (used by the bench to compare policies on one trace) counts exactly
    what the live store counts with prefetch off; Belady's optimum is never beaten."""
    from amoe_serve.model import expert_buffer as eb

    spec = load_spec(mixtral)
    pairs = [(b, e) for b in range(3) for e in range(6) if e % 2 == 1]
    calls = _random_calls(spec, pairs, 40, seed=7)
    y = torch.randn(20, spec.hidden_size)
    rec = BufferedExpertSide.load(mixtral, spec, None, pairs, 9, prefetch=False, record=True)
    for b, experts, counts in calls:
        rec.run_grouped(b, experts, counts, y[:sum(counts)])
    st = rec.stats()
    assert st["pairs"] == [list(p) for p in sorted(pairs)]
    assert st["accesses"] == [[[b, e] for e in ex] for b, ex, _ in calls]
    trace = [[tuple(k) for k in step] for step in st["accesses"]]
    for S in (1, 2, 4):
        hits = {}
        for ev in ("lifo", "lru", "fifo"):
            live = BufferedExpertSide.load(mixtral, spec, None, pairs, S, ev, prefetch=False)
            for b, experts, counts in calls:
                live.run_grouped(b, experts, counts, y[:sum(counts)])
            assert eb.replay(trace, pairs, S, ev) == (live.hits, live.misses)
            hits[ev] = live.hits
        best, _ = eb.replay(trace, pairs, S, "belady")
        assert best >= max(hits.values())
    assert eb.replay(trace, pairs, 9, "lru") == (sum(len(k) for k in trace), 0)
