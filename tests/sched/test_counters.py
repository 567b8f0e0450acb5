import json
from typing import Iterable

import numpy as np
import pytest

from amoe_serve.counters import RankCounters


# Merging several ranks' summaries: not used by the package (the gateway keeps them per rank),
# kept here as the check that a summary carries what a merge needs.
def merge(dicts: Iterable[dict]) -> dict:
    """Aggregate several ranks' summaries (same [NB, NS] shape required).

    Per-layer tokens/batches are summed, depth max is the max, depth mean is the
    sampled-time-weighted mean over ranks; totals and ratios are recomputed.
    """
    dicts = list(dicts)
    if not dicts:
        raise ValueError("merge needs at least one counters summary")
    shape = np.asarray(dicts[0]["tokens_per_layer"]).shape
    for d in dicts:
        if np.asarray(d["tokens_per_layer"]).shape != shape:
            raise ValueError(
                f"cannot merge counters of different shapes {shape} and {np.asarray(d['tokens_per_layer']).shape}"
            )
    tokens = sum(np.asarray(d["tokens_per_layer"], dtype=np.int64) for d in dicts)
    batches = sum(np.asarray(d["batches_per_layer"], dtype=np.int64) for d in dicts)
    hist: dict[int, int] = {}
    for d in dicts:
        for k, v in d["batch_hist"].items():
            hist[int(k)] = hist.get(int(k), 0) + int(v)
    busy = sum(float(d["busy_s"]) for d in dicts)
    idle = sum(float(d["idle_s"]) for d in dicts)
    depth_max = np.maximum.reduce([np.asarray(d["queue_depth_max"], dtype=np.int64) for d in dicts])
    times = [float(d.get("queue_depth_time_s", 0.0)) for d in dicts]
    total_time = sum(times)
    if total_time > 0:
        depth_mean = sum(np.asarray(d["queue_depth_mean"], dtype=np.float64) * t for d, t in zip(dicts, times)) / total_time
    else:
        depth_mean = np.zeros(shape, dtype=np.float64)
    total_tokens = int(tokens.sum())
    total_batches = int(batches.sum())
    wall = busy + idle
    return {
        "num_ranks": sum(int(d.get("num_ranks", 1)) for d in dicts),
        "tokens_per_layer": tokens.tolist(),
        "batches_per_layer": batches.tolist(),
        "total_tokens": total_tokens,
        "total_batches": total_batches,
        "mean_batch": total_tokens / total_batches if total_batches else 0.0,
        "batch_hist": {str(k): v for k, v in sorted(hist.items())},
        "busy_s": busy,
        "idle_s": idle,
        "idle_fraction": idle / wall if wall > 0 else 0.0,
        "queue_depth_max": depth_max.tolist(),
        "queue_depth_mean": np.asarray(depth_mean).tolist(),
        "queue_depth_time_s": total_time,
    }


def test_batches_hist_and_time():
    c = RankCounters(2, 3)
    for b, s, n in [(0, 0, 1), (0, 0, 3), (1, 2, 4), (1, 2, 5), (0, 1, 64)]:
        c.record_batch(b, s, n)
    c.record_busy(3.0)
    c.record_idle(1.0)
    d = c.to_dict()
    json.dumps(d)  # JSON-able
    assert d["tokens_per_layer"] == [[4, 64, 0], [0, 0, 9]]
    assert d["batches_per_layer"] == [[2, 1, 0], [0, 0, 2]]
    assert d["mean_batch"] == pytest.approx(77 / 5)
    assert d["batch_hist"] == {"1": 1, "4": 2, "8": 1, "64": 1}
    assert d["busy_s"] == 3.0 and d["idle_s"] == 1.0 and d["idle_fraction"] == 0.25


def test_record_batches_is_record_batch_of_each():
    a, b = RankCounters(2, 3), RankCounters(2, 3)
    a.record_batches(1, [2, 0], [5, 1])
    b.record_batch(1, 2, 5)
    b.record_batch(1, 0, 1)
    assert a.to_dict() == b.to_dict()
    assert a.tokens_BS.tolist() == [[0, 0, 0], [1, 0, 5]] and a.batches_BS.tolist() == [[0, 0, 0], [1, 0, 1]]
    with pytest.raises(ValueError):
        a.record_batches(0, [0], [0])


def test_queue_depths_max_and_time_weighted_mean():
    c = RankCounters(1, 2)
    c.record_queue_depths(np.array([[4, 0]]), dt=1.0)
    c.record_queue_depths(np.array([[0, 10]]), dt=3.0)
    c.record_queue_depths(np.array([[100, 0]]), dt=0.0)  # instant sample: max only
    d = c.to_dict()
    assert d["queue_depth_max"] == [[100, 10]]
    np.testing.assert_allclose(d["queue_depth_mean"], [[1.0, 7.5]])
    with pytest.raises(ValueError, match="shape"):
        c.record_queue_depths(np.zeros((2, 2)), 1.0)


def test_sample_queue_depths_throttles_to_the_sample_interval():
    from amoe_serve.counters import DEPTH_SAMPLE_S
    c = RankCounters(1, 1)
    c.sample_queue_depths(np.array([[7]]), now=10.0)  # starts the clock only
    c.sample_queue_depths(np.array([[9]]), now=10.0 + DEPTH_SAMPLE_S / 2)  # too soon: skipped
    assert c.to_dict()["queue_depth_max"] == [[0]]
    c.sample_queue_depths(np.array([[3]]), now=10.0 + 2 * DEPTH_SAMPLE_S)  # the whole span, at 3
    c.sample_queue_depths(np.array([[5]]), now=10.0 + 4 * DEPTH_SAMPLE_S)
    d = c.to_dict()
    assert d["queue_depth_max"] == [[5]]
    np.testing.assert_allclose(d["queue_depth_mean"], [[4.0]])


def test_empty_and_errors():
    d = RankCounters(1, 1).to_dict()
    assert d["mean_batch"] == 0.0 and d["idle_fraction"] == 0.0 and d["queue_depth_mean"] == [[0.0]]
    c = RankCounters(1, 1)
    with pytest.raises(ValueError):
        c.record_batch(0, 0, 0)
    with pytest.raises(ValueError):
        c.record_busy(-1)


def test_merge():
    a, b = RankCounters(1, 2), RankCounters(1, 2)
    a.record_batch(0, 0, 2)
    b.record_batch(0, 0, 6)
    b.record_batch(0, 1, 1)
    a.record_busy(1.0)
    b.record_idle(1.0)
    a.record_queue_depths(np.array([[2, 0]]), 1.0)
    b.record_queue_depths(np.array([[8, 4]]), 3.0)
    m = merge([a.to_dict(), b.to_dict()])
    json.dumps(m)
    assert m["num_ranks"] == 2
    assert m["tokens_per_layer"] == [[8, 1]] and m["batches_per_layer"] == [[2, 1]]
    assert m["mean_batch"] == pytest.approx(3.0)
    assert m["batch_hist"] == {"1": 1, "2": 1, "8": 1}
    assert m["idle_fraction"] == 0.5
    assert m["queue_depth_max"] == [[8, 4]]
    np.testing.assert_allclose(m["queue_depth_mean"], [[(2 * 1 + 8 * 3) / 4, 3.0]])
    # merging merged summaries is consistent
    assert merge([m])["tokens_per_layer"] == [[8, 1]]
    with pytest.raises(ValueError, match="shape"):
        merge([a.to_dict(), RankCounters(2, 2).to_dict()])
    with pytest.raises(ValueError):
        merge([])
