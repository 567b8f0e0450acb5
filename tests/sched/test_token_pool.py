import random

import pytest
import torch

from amoe_serve.sched.token_pool import TokenPool

T, K, D = 5, 3, 4


def _expected_TKD(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, K, D, generator=g)


def _deliveries(exp_TKD, num_ranks, seed):
    """Split all (token, slot) pairs over fake expert ranks, shuffled, in chunks."""
    pairs = [(t, k) for t in range(T) for k in range(K)]
    rnd = random.Random(seed)
    rnd.shuffle(pairs)
    per_rank = [pairs[r::num_ranks] for r in range(num_ranks)]
    chunks = []
    for rank_pairs in per_rank:
        i = 0
        while i < len(rank_pairs):
            n = rnd.randint(1, 3)
            chunks.append(rank_pairs[i : i + n])
            i += n
    rnd.shuffle(chunks)
    out = []
    for c in chunks:
        tok_R = torch.tensor([t for t, _ in c])
        slot_R = torch.tensor([k for _, k in c])
        out.append((tok_R, slot_R, exp_TKD[tok_R, slot_R]))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_any_order_completes_exactly_once(seed):
    exp_TKD = _expected_TKD(seed)
    pool = TokenPool()
    pool.open(("seg", 7), T, K, D, torch.float32, context={"rid": 1})
    dels = _deliveries(exp_TKD, num_ranks=3, seed=seed)
    results = [pool.add(("seg", 7), *d) for d in dels]
    assert results[-1] is True and results.count(True) == 1
    assert pool.pending_keys() == []
    out_TKD, ctx = pool.pop(("seg", 7))
    assert ctx == {"rid": 1}
    torch.testing.assert_close(out_TKD, exp_TKD)
    assert len(pool) == 0 and ("seg", 7) not in pool


def test_interleaved_entries():
    pool = TokenPool()
    exps = {("s", b): _expected_TKD(b) for b in range(3)}
    queue = []
    for key, exp in exps.items():
        pool.open(key, T, K, D, torch.float32, context=key)
        queue += [(key, d) for d in _deliveries(exp, 2, seed=17 + key[1])]  # fixed: hash() of a str changes per process
    random.Random(3).shuffle(queue)
    completed = []
    for key, d in queue:
        if pool.add(key, *d):
            completed.append(key)
    assert sorted(completed) == sorted(exps)
    for key, exp in exps.items():
        out, ctx = pool.pop(key)
        assert ctx == key
        torch.testing.assert_close(out, exp)


def test_duplicates_and_range_rejected_without_corruption():
    pool = TokenPool()
    pool.open("k", 2, 2, D, torch.float32)
    row = torch.ones(1, D)
    assert pool.add("k", torch.tensor([0]), torch.tensor([1]), row) is False
    with pytest.raises(ValueError, match="already delivered"):
        pool.add("k", torch.tensor([0]), torch.tensor([1]), row)
    with pytest.raises(ValueError, match="twice"):
        pool.add("k", torch.tensor([1, 1]), torch.tensor([0, 0]), torch.ones(2, D))
    with pytest.raises(ValueError, match="out of range"):
        pool.add("k", torch.tensor([2]), torch.tensor([0]), row)
    with pytest.raises(ValueError, match="out of range"):
        pool.add("k", torch.tensor([0]), torch.tensor([-1]), row)
    with pytest.raises(ValueError, match="shape"):
        pool.add("k", torch.tensor([0]), torch.tensor([0]), torch.ones(1, D + 1))
    # Rejected deliveries wrote nothing: the three missing pairs still complete it.
    assert pool.add("k", torch.tensor([0, 1]), torch.tensor([0, 0]), torch.ones(2, D)) is False
    with pytest.raises(ValueError, match="incomplete"):
        pool.pop("k")
    assert pool.pending_keys() == ["k"]
    assert pool.add("k", torch.tensor([1]), torch.tensor([1]), row) is True
    out, _ = pool.pop("k")
    assert out.sum().item() == 4 * D


def test_unknown_key_and_double_open():
    pool = TokenPool()
    with pytest.raises(ValueError, match="unknown"):
        pool.add("nope", torch.tensor([0]), torch.tensor([0]), torch.ones(1, D))
    with pytest.raises(ValueError, match="unknown"):
        pool.pop("nope")
    pool.open("a", 1, 1, D, torch.float32)
    with pytest.raises(ValueError, match="already open"):
        pool.open("a", 1, 1, D, torch.float32)


def test_empty_entry_complete_at_open():
    pool = TokenPool()
    pool.open("e", 0, K, D, torch.bfloat16, context="ctx")
    assert "e" in pool and pool.is_complete("e") and pool.pending_keys() == []
    out, ctx = pool.pop("e")
    assert out.shape == (0, K, D) and out.dtype == torch.bfloat16 and ctx == "ctx"


def test_dtype_cast_on_add():
    pool = TokenPool()
    pool.open("b", 1, 1, D, torch.bfloat16)
    assert pool.add("b", torch.tensor([0]), torch.tensor([0]), torch.full((1, D), 2.0))
    out, _ = pool.pop("b")
    assert out.dtype == torch.bfloat16 and (out == 2).all()
