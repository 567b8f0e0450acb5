"""Unit tests of loadtests.workloads (pure stdlib, fast)."""

import random
import statistics

import pytest

from loadtests.workloads import (
    WORKLOADS,
    PoissonClock,
    get_workload,
    make_prompt,
    make_request,
    poisson_arrival_times,
    poisson_interarrivals,
    request_stream,
)

PAPER = {"short": (30, 70, 70, 130), "medium": (50, 150, 50, 250), "reasonable": (100, 300, 100, 500)}


def test_paper_ranges():
    assert set(WORKLOADS) == set(PAPER)
    for name, (imin, imax, omin, omax) in PAPER.items():
        wl = get_workload(name)
        assert (wl.input_min, wl.input_max, wl.output_min, wl.output_max) == (imin, imax, omin, omax)
    with pytest.raises(ValueError):
        get_workload("huge")


@pytest.mark.parametrize("name", sorted(PAPER))
def test_lengths_within_ranges_and_uniform(name):
    imin, imax, omin, omax = PAPER[name]
    rng = random.Random(123)
    ins, outs = [], []
    for _ in range(3000):
        r = make_request(name, rng, model="m")
        assert imin <= r.input_tokens <= imax
        assert omin <= r.output_tokens <= omax
        # byte-level tokenizer: prompt chars == drawn input tokens
        assert len(r.body["prompt"]) == r.input_tokens
        assert r.body["prompt"].isascii() and not r.body["prompt"].endswith(" ")
        assert r.body["max_tokens"] == r.output_tokens
        assert r.body["ignore_eos"] is True and r.body["stream"] is True
        assert r.body["model"] == "m"
        assert r.body["stream_options"] == {"include_usage": True}
        ins.append(r.input_tokens)
        outs.append(r.output_tokens)
    # uniform: both ends are hit and the mean is near the midpoint
    assert min(ins) == imin and max(ins) == imax and min(outs) == omin and max(outs) == omax
    assert abs(statistics.mean(ins) - (imin + imax) / 2) < 0.05 * (imax - imin)
    assert abs(statistics.mean(outs) - (omin + omax) / 2) < 0.05 * (omax - omin)


def test_seeded_determinism():
    a = [make_request("medium", 7).body for _ in range(3)]
    assert a[0] == a[1] == a[2]
    s1, s2, s3 = request_stream("reasonable", 42), request_stream("reasonable", 42), request_stream("reasonable", 43)
    x = [next(s1).body for _ in range(20)]
    y = [next(s2).body for _ in range(20)]
    z = [next(s3).body for _ in range(20)]
    assert x == y
    assert x != z
    assert poisson_interarrivals(3.0, 50, seed=5) == poisson_interarrivals(3.0, 50, seed=5)
    assert poisson_interarrivals(3.0, 50, seed=5) != poisson_interarrivals(3.0, 50, seed=6)


def test_tokens_per_char():
    rng = random.Random(0)
    assert len(make_prompt(100, rng, tokens_per_char=0.25)) == 400
    assert len(make_prompt(100, rng, tokens_per_char=2.0)) == 50
    assert len(make_prompt(1, rng)) == 1
    r = make_request("short", 1, tokens_per_char=0.5)
    assert len(r.body["prompt"]) == 2 * r.input_tokens
    with pytest.raises(ValueError):
        make_prompt(10, rng, tokens_per_char=0)


@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
def test_poisson_mean_and_shape(rate):
    gaps = poisson_interarrivals(rate, 20000, seed=1)
    assert all(g > 0 for g in gaps)
    mean = statistics.mean(gaps)
    assert abs(mean - 1 / rate) < 0.03 / rate  # 20k samples: std error of the mean ~0.7%
    # exponential: std == mean, P(gap > mean) = 1/e
    assert abs(statistics.pstdev(gaps) - mean) < 0.05 * mean
    frac = sum(g > 1 / rate for g in gaps) / len(gaps)
    assert abs(frac - 0.3679) < 0.02
    times = poisson_arrival_times(rate, 20000, seed=1)
    assert times == sorted(times)
    assert abs(times[-1] - sum(gaps)) < 1e-6 * times[-1]


def test_poisson_clock_shared_schedule():
    clock = PoissonClock(rate=10.0, seed=3)
    expected = poisson_arrival_times(10.0, 5000, seed=3, start=100.0)
    # Many users claim slots at time 100 without sleeping: delays are the schedule itself.
    delays = [clock.claim(100.0) for _ in range(5000)]
    assert delays == pytest.approx([t - 100.0 for t in expected])
    assert clock.late == 0 and clock.claimed == 5000
    assert abs(statistics.mean(b - a for a, b in zip(delays, delays[1:])) - 0.1) < 0.005


def test_poisson_clock_late_arrivals_keep_schedule():
    clock = PoissonClock(rate=100.0, seed=0)
    first = clock.claim(0.0)
    assert first > 0
    # A user that comes back 10 s later finds the schedule behind: delay 0, counted late.
    assert clock.claim(10.0) == 0.0
    assert clock.late == 1 and clock.total_lag > 9.0
    with pytest.raises(ValueError):
        PoissonClock(0)
