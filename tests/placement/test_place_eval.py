"""evaluate() checked by hand; `amoe-serve place` / `place-eval` through the real CLI entry point.

Legend: B blocks, E experts, R ranks.
"""

import json

import numpy as np
import pytest

from amoe_serve.cli import main
from amoe_serve.placement.layout import Placement
from amoe_serve.placement.evaluate import evaluate, plan_and_evaluate
from tests.placement.synthetic import synthetic_trace
from amoe_serve.placement.trace import Trace


def tiny_trace() -> Trace:
    t = Trace(2, 2, 1)
    t.tokens_W = [8]
    t.load_WBE = [np.array([[6, 2], [4, 2]])]
    t.trans_WLEE = [np.array([[[3, 1], [2, 0]]])]   # e0@0 -> e0@1: 3, e0 -> e1: 1, e1 -> e0: 2
    return t


def test_evaluate_by_hand_with_a_replica():
    # Block 0: e0 on rank 0, e1 on rank 1. Block 1: e0 on rank 0 and (replica) rank 1, e1 on rank 1.
    p = Placement.from_arrays([[0, 1], [0, 1]], 2, [[[], []], [[1], []]])
    ev = evaluate(p, tiny_trace(), bandwidth=[[0, 5], [2, 0]])
    # Block 0 loads (6, 2): max/mean 6/4. Block 1: e0's 4 rows split 2/2, e1's 2 on rank 1: (2, 4), 4/3.
    assert ev["load_BR"] == [[6, 2], [2, 4]]
    assert ev["max_over_mean_B"] == pytest.approx([1.5, 4 / 3])
    assert ev["max_over_mean"] == pytest.approx((1.5 + 4 / 3) / 2)
    assert ev["max_over_mean_worst"] == pytest.approx(1.5)
    assert ev["max_load_sum"] == 10
    # Cross-rank, in expectation under the even split: e0->e0 3 * 1/2, e0->e1 1 * 1, e1->e0 2 * 1/2.
    assert ev["transitions"] == 6
    assert ev["cross_rank_transitions"] == pytest.approx(3.5)
    assert ev["cross_rank_fraction"] == pytest.approx(3.5 / 6)
    # Weighted: e0->e0 3 * (1/2 * 5), e0->e1 1 * 5, e1->e0 2 * (1/2 * 2) = 7.5 + 5 + 2.
    assert ev["traffic_cost"] == pytest.approx(14.5)
    assert ev["memory_R"] == [2, 3] and ev["memory_max"] == 3 and ev["replicas"] == 1


def test_evaluate_without_replicas_and_with_an_empty_block():
    t = tiny_trace()
    t.load_WBE = [np.array([[6, 2], [0, 0]])]
    ev = evaluate(Placement.from_arrays([[1, 0], [0, 1]], 2), t)
    assert ev["load_BR"] == [[2, 6], [0, 0]]
    assert ev["max_over_mean_B"] == [1.5, 1.0] and ev["max_over_mean"] == 1.5   # idle block left out
    # e0 (rank 1) -> e0 (rank 0): 3, e0 -> e1 (rank 1): 1 stays, e1 (rank 0) -> e0 (rank 0): 2 stays.
    assert ev["cross_rank_transitions"] == 3 and ev["traffic_cost"] == 3


def skewed_trace_file(tmp_path, **kw):
    args = dict(num_blocks=4, num_experts=8, top_k=2, tokens=2000, windows=4, rate=0.5, seed=1)
    args.update(kw)
    path = tmp_path / "trace.json"
    synthetic_trace(**args).save(path)
    return path


@pytest.mark.parametrize("policy,extra", [("contiguous", []), ("greedy", []), ("ilp", []),
                                          ("replicate", ["--replica-slots", "2"])])
def test_place_writes_a_placement_the_data_plane_accepts(tmp_path, capsys, policy, extra):
    trace = skewed_trace_file(tmp_path)
    out = tmp_path / "sub" / "placement.json"
    rc = main(["place", "--trace", str(trace), "--ranks", "4", "--policy", policy, "--output", str(out),
               "--time-limit", "20", "--quiet", *extra])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    p = Placement.from_file(out, 4, 8, 4)
    data = json.loads(out.read_text())
    assert data["policy"] == policy and data["meta"]["objective_on_trace"]["max_over_mean"] > 0
    assert cap.out.count("\n") == 1 and cap.out.startswith(f"wrote {out}: policy {policy}")
    if policy == "replicate":
        assert 0 < p.num_replicas and max(n for n in np.bincount(
            [r for row in p.replicas_BE for reps in row for r in reps], minlength=4)) <= 2


def test_place_with_a_bandwidth_matrix(tmp_path, capsys):
    trace = skewed_trace_file(tmp_path)
    bw = tmp_path / "bw.txt"
    bw.write_text("0 1 4 4\n1 0 4 4\n4 4 0 1\n4 4 1 0\n")
    out = tmp_path / "p.json"
    assert main(["place", "--trace", str(trace), "--ranks", "4", "--policy", "ilp", "--output", str(out),
                 "--bandwidth", str(bw), "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["bandwidth"][0] == [0, 1, 4, 4]
    assert data["meta"]["solver"]["stage2"]["uniform_cost"] is False


@pytest.mark.parametrize("content,msg", [
    ("{not json", "is not valid JSON"),
    ('{"format": "something-else"}', "not an 'amoe-trace' file"),
    ('{"format": "amoe-trace", "version": 1, "num_blocks": 2, "num_experts": 2, "top_k": 1, '
     '"windows": [{"tokens": 1, "load": [[1, 0]], "transitions": []}]}', "window 0 has load"),
])
def test_place_bad_trace_exits_2_with_one_clear_line(tmp_path, capsys, content, msg):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    rc = main(["place", "--trace", str(bad), "--ranks", "2", "--policy", "greedy", "--output",
               str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.startswith("amoe-serve: error: ") and err.count("\n") == 1
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("args,msg", [
    (["--trace", "MISSING"], "trace file not found"),
    (["--ranks", "9"], "only 8 experts"),
    (["--bandwidth", "BW"], "shape"),
    (["--time-limit", "0"], "--time-limit must be positive"),
])
def test_place_usage_errors_exit_2(tmp_path, capsys, args, msg):
    trace = skewed_trace_file(tmp_path)
    (tmp_path / "bw.json").write_text("[[0, 1], [1, 0]]")
    base = {"--trace": str(trace), "--ranks": "4", "--policy": "ilp", "--output": str(tmp_path / "p.json")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = {"MISSING": str(tmp_path / "none.json"), "BW": str(tmp_path / "bw.json")}.get(v, v)
    rc = main(["place", *[x for kv in base.items() for x in kv], "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err, err


def test_place_eval_writes_table_json_and_plot(tmp_path, capsys):
    trace = skewed_trace_file(tmp_path)
    out = tmp_path / "eval"
    rc = main(["place-eval", "--trace", str(trace), "--ranks", "4", "--out", str(out), "--time-limit", "20",
               "--quiet"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads((out / "results.json").read_text())
    rows = {r["policy"]: r for r in res["rows"]}
    assert list(rows) == ["contiguous", "greedy", "ilp", "replicate"]
    assert res["windows"] == [2, 2]
    held = {k: r["held_out"]["max_over_mean"] for k, r in rows.items()}
    assert held["greedy"] < held["contiguous"] and held["ilp"] < held["contiguous"]
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 5 and "| ilp |" in md and md in cap.out
    png = (out / "place_eval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_plan_and_evaluate_needs_two_windows(tmp_path):
    from amoe_serve.placement.trace import TraceError
    t = synthetic_trace(2, 4, 1, tokens=100, windows=1)
    with pytest.raises(TraceError, match="at least 2"):
        plan_and_evaluate(t, 2, ["greedy"])
