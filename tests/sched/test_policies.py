import numpy as np
import pytest

from amoe_serve.sched.policies import (
    FLFS,
    MTFS,
    Defrag,
    Scheduler,
    make_scheduler,
    pick_block_group,
)


def Q(rows):
    return np.array(rows, dtype=np.int64)


@pytest.mark.parametrize("policy", ["defrag", "mtfs", "flfs"])
def test_all_empty_returns_none(policy):
    assert make_scheduler(policy).pick(np.zeros((4, 3), dtype=np.int64)) is None


def test_make_scheduler():
    assert isinstance(make_scheduler("mtfs"), MTFS)
    assert isinstance(make_scheduler("FLFS"), FLFS)
    d = make_scheduler("defrag", lookahead=2, decay=0.5)
    assert isinstance(d, Defrag) and d.lookahead == 2 and d.decay == 0.5
    for s in (MTFS(), FLFS(), d):
        assert isinstance(s, Scheduler)
    with pytest.raises(ValueError, match="defrag.*mtfs.*flfs"):
        make_scheduler("fifo")


def test_mtfs_argmax_and_ties():
    assert MTFS().pick(Q([[1, 2], [9, 0], [3, 4]])) == (1, 0)
    assert MTFS().pick(Q([[0, 5], [5, 5]])) == (0, 1)  # tie -> lowest block, then slot
    assert MTFS().pick(Q([[0, 0], [5, 5]])) == (1, 0)


def test_flfs_lowest_block_then_longest_slot():
    assert FLFS().pick(Q([[0, 0, 0], [1, 7, 3], [100, 0, 0]])) == (1, 1)
    assert FLFS().pick(Q([[2, 2, 0], [9, 9, 9]])) == (0, 0)


def _defrag_reference(Q_BS, K, delta):
    NB, NS = Q_BS.shape
    best, best_score = None, -np.inf
    for b in range(NB):
        lscore = sum(Q_BS[(b + k) % NB].sum() / NS * delta**k for k in range(1, K + 1))
        for s in range(NS):
            if Q_BS[b, s] > 0 and lscore + Q_BS[b, s] > best_score:
                best, best_score = (b, s), lscore + Q_BS[b, s]
    return best


def test_defrag_exact_formula_handcrafted():
    # NB=4, NS=2, K=3, δ=0.8. Row means: [1, 0, 5, 0.5].
    m = Q([[2, 0], [0, 0], [10, 0], [1, 0]])
    d = Defrag(3, 0.8)
    lscore = d.lscore(m)
    exp = [
        0 * 0.8 + 5 * 0.64 + 0.5 * 0.512,  # b=0 sees 1,2,3
        5 * 0.8 + 0.5 * 0.64 + 1 * 0.512,  # b=1 sees 2,3,0
        0.5 * 0.8 + 1 * 0.64 + 0 * 0.512,  # b=2 sees 3,0,1
        1 * 0.8 + 0 * 0.64 + 5 * 0.512,  # b=3 sees 0,1,2 (wraps)
    ]
    np.testing.assert_allclose(lscore, exp)
    scores = d.scores(m)
    assert np.isneginf(scores[1]).all() and np.isneginf(scores[0, 1])
    np.testing.assert_allclose(scores[0, 0], exp[0] + 2)
    # b=2 score 10+1.04=11.04 beats b=0 (5.456) and b=3 (4.36)
    assert d.pick(m) == (2, 0)


def test_defrag_prefers_merging_over_biggest():
    # MTFS runs the 8 at block 2; Defrag runs the 5 at block 1 so it lands on the 8.
    m = Q([[0], [5], [8], [0], [0], [0], [0], [0]])
    assert MTFS().pick(m) == (2, 0)
    assert Defrag().pick(m) == (1, 0)


def test_defrag_ties_and_zero_lookahead():
    m = Q([[3, 3], [0, 0], [3, 3], [0, 0]])
    assert Defrag().pick(m) == (0, 0)
    m2 = Q([[1, 0], [0, 9], [4, 0]])
    assert Defrag(lookahead=0).pick(m2) == MTFS().pick(m2) == (1, 1)


def test_defrag_matches_reference_randomized():
    rng = np.random.default_rng(0)
    for K, delta in [(3, 0.8), (1, 0.5), (5, 0.9), (2, 1.0)]:
        d = Defrag(K, delta)
        for _ in range(300):
            NB, NS = int(rng.integers(1, 9)), int(rng.integers(1, 5))
            m = rng.integers(0, 6, size=(NB, NS)) * (rng.random((NB, NS)) < 0.5)
            assert d.pick(m) == _defrag_reference(m, K, delta)


def test_defrag_one_busy_block_shortcut_matches_reference():
    """Only one block's queues hold rows (one dispatch landed): the pick skips scoring and must
    still be the scored argmax, ties to the first slot included."""
    rng = np.random.default_rng(1)
    d = Defrag(3, 0.8)
    for _ in range(300):
        NB, NS = int(rng.integers(1, 17)), int(rng.integers(2, 9))
        m = np.zeros((NB, NS), dtype=np.int64)
        b = int(rng.integers(0, NB))
        m[b] = rng.integers(0, 4, size=NS)
        if m[b].sum() == 0:
            m[b, 0] = 1
        assert d.pick(m) == _defrag_reference(m, 3, 0.8)


def test_defrag_validation():
    with pytest.raises(ValueError):
        Defrag(lookahead=-1)
    with pytest.raises(ValueError):
        Defrag(decay=1.5)
    with pytest.raises(ValueError, match="2-D"):
        Defrag().pick(np.zeros(3))


def test_pick_block_group():
    m = Q([[0, 3, 0, 1], [0, 0, 0, 0]])
    assert pick_block_group(m, 0) == [1, 3]
    assert pick_block_group(m, 1) == []
    with pytest.raises(ValueError):
        pick_block_group(m, 2)
