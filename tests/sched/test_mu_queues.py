import numpy as np
import pytest

from amoe_serve.sched.queues import MuQueues


def test_push_pop_fifo_and_lengths():
    q = MuQueues(3, 2)
    q.push(1, 0, "a", 4)
    q.push(1, 0, "b", 2)
    q.push(2, 1, "c", 5)
    assert q.lengths.tolist() == [[0, 0], [6, 0], [0, 5]]
    assert q.total() == 11 and len(q) == 3 and not q.is_empty()
    assert q.pop(1, 0) == ["a", "b"]
    assert q.lengths[1, 0] == 0 and q.total() == 5
    assert q.pop(1, 0) == []
    assert q.pop(2, 1) == ["c"]
    assert q.is_empty() and q.total() == 0 and len(q) == 0


def test_pop_max_tokens_stops_before_exceeding():
    q = MuQueues(1, 1)
    for name, n in [("a", 3), ("b", 3), ("c", 3)]:
        q.push(0, 0, name, n)
    assert q.pop(0, 0, max_tokens=7) == ["a", "b"]
    assert q.lengths[0, 0] == 3
    assert q.pop(0, 0, max_tokens=3) == ["c"]


def test_pop_max_tokens_always_takes_one_item():
    q = MuQueues(1, 1)
    q.push(0, 0, "big", 10)
    q.push(0, 0, "small", 1)
    assert q.pop(0, 0, max_tokens=4) == ["big"]  # oversized head still makes progress
    assert q.lengths[0, 0] == 1


def test_lengths_is_not_copied():
    q = MuQueues(2, 2)
    view = q.lengths
    q.push(0, 1, "x", 7)
    assert view[0, 1] == 7 and view is q.lengths
    assert view.dtype == np.int64 and view.shape == (2, 2)


def test_errors():
    with pytest.raises(ValueError):
        MuQueues(0, 1)
    q = MuQueues(2, 2)
    with pytest.raises(ValueError, match="out of range"):
        q.push(2, 0, "x", 1)
    with pytest.raises(ValueError, match="out of range"):
        q.pop(0, 5)
    with pytest.raises(ValueError, match="num_tokens"):
        q.push(0, 0, "x", -1)
    with pytest.raises(ValueError, match="max_tokens"):
        q.pop(0, 0, max_tokens=0)


def test_randomized_lengths_match_contents():
    rng = np.random.default_rng(1)
    q = MuQueues(4, 3)
    shadow = {(b, s): [] for b in range(4) for s in range(3)}
    for i in range(2000):
        b, s = int(rng.integers(4)), int(rng.integers(3))
        if rng.random() < 0.6:
            n = int(rng.integers(1, 9))
            q.push(b, s, (i, n), n)
            shadow[b, s].append((i, n))
        else:
            mt = None if rng.random() < 0.5 else int(rng.integers(1, 20))
            got = q.pop(b, s, mt)
            exp, acc = [], 0
            for it in list(shadow[b, s]):
                if mt is not None and exp and acc + it[1] > mt:
                    break
                exp.append(it)
                acc += it[1]
            del shadow[b, s][: len(exp)]
            assert got == exp
        expected = np.array([[sum(n for _, n in shadow[b, s]) for s in range(3)] for b in range(4)])
        assert (q.lengths == expected).all()
    assert q.total() == q.lengths.sum()


def test_push_many_is_push_of_each():
    a, b = MuQueues(3, 4), MuQueues(3, 4)
    items, slots, counts = ["x", "y", "z"], [3, 0, 2], [5, 0, 7]
    a.push_many(1, slots, items, counts)
    for s, it, n in zip(slots, items, counts):
        b.push(1, s, it, n)
    assert np.array_equal(a.lengths, b.lengths) and a.total() == b.total() == 12 and len(a) == len(b) == 3
    assert [a.pop(1, s) for s in range(4)] == [b.pop(1, s) for s in range(4)]
    a.push_many(0, [], [], [])
    assert a.is_empty()
    for bad in [(3, [0], ["i"], [1]), (0, [4], ["i"], [1]), (0, [-1], ["i"], [1]), (0, [0], ["i"], [-1]),
                (0, [0, 1], ["i"], [1, 1])]:
        with pytest.raises(ValueError):
            a.push_many(*bad)
    assert a.is_empty() and a.total() == 0
