import json

import pytest

from amoe_serve.engine.admission import Admission, Limits
from amoe_serve.placement.layout import Placement, PlacementError
from amoe_serve.engine.topology import Topology
from amoe_serve.requests_io import GenerateRequest
from amoe_serve.sampler import SamplingParams


def test_contiguous_placement_splits_evenly():
    p = Placement.contiguous(num_blocks=2, num_experts=6, expert_ranks=4)
    assert p.rank_BE[0] == (0, 0, 1, 1, 2, 3)
    assert p.pairs_of(3) == [(0, 5), (1, 5)]
    every = sorted(pair for r in range(4) for pair in p.pairs_of(r))
    assert every == [(b, e) for b in range(2) for e in range(6)]


def test_placement_refuses_more_ranks_than_experts():
    with pytest.raises(PlacementError, match="only 2 experts"):
        Placement.contiguous(1, 2, 3)


@pytest.mark.parametrize("content,msg", [
    ("not json", "not valid JSON"),
    (json.dumps({"wrong": 1}), "key 'experts'"),
    (json.dumps({"experts": [[0, 1]]}), "model has 2"),
    (json.dumps({"experts": [[0, 1], [0]]}), "places 1 experts"),
    (json.dumps({"experts": [[0, 1], [0, 5]]}), "rank 5"),
])
def test_placement_file_validation(tmp_path, content, msg):
    f = tmp_path / "p.json"
    f.write_text(content)
    with pytest.raises(PlacementError, match=msg):
        Placement.from_file(f, num_blocks=2, num_experts=2, expert_ranks=2)


def test_placement_file_round_trip(tmp_path):
    p = Placement(((1, 0, 1), (0, 0, 1)), 2)
    f = tmp_path / "p.json"
    f.write_text(p.to_json())
    assert Placement.from_file(f, 2, 3, 2) == p
    with pytest.raises(PlacementError, match="not found"):
        Placement.from_file(tmp_path / "missing.json", 2, 3, 2)


def test_topology_roles():
    t = Topology(2, 3)
    assert t.world_size == 6 and t.attention == [1, 2] and t.experts == [3, 4, 5]
    assert [t.role(r) for r in range(6)] == ["gateway"] + ["attention"] * 2 + ["expert"] * 3
    assert t.expert_rank(0) == 3


def _req(rid, n_prompt, max_tokens):
    return GenerateRequest(rid, list(range(n_prompt)), SamplingParams(max_tokens=max_tokens))


def test_admission_balances_on_free_kv_and_never_overcommits():
    lim = Limits(max_model_len=100, block_size=4, blocks_per_rank=10, max_running_per_rank=8)
    adm = Admission([1, 2], lim)
    for i, n in enumerate([12, 4, 4, 8]):
        adm.enqueue(_req(f"r{i}", n, 4))
    placed = adm.next_placements()
    # r0 needs 4 blocks -> rank 1 (tie, lowest rank); r1 (2) -> rank 2; r2 (2) -> rank 2 (8 free vs 6);
    # r3 (3) -> rank 1 (6 free vs 6 -> lowest rank)
    assert [(r.id, rank) for r, rank in placed] == [("r0", 1), ("r1", 2), ("r2", 2), ("r3", 1)]
    assert adm.free == {1: 3, 2: 6}
    adm.enqueue(_req("big", 30, 6))   # 9 blocks: no room anywhere yet
    assert adm.next_placements() == []
    adm.release("r1"), adm.release("r2")
    assert [(r.id, rank) for r, rank in adm.next_placements()] == [("big", 2)]
    assert adm.free == {1: 3, 2: 1}


def test_limits_explain_why_a_request_can_never_run():
    lim = Limits(max_model_len=32, block_size=4, blocks_per_rank=4, max_running_per_rank=8)
    assert "exceeds the context limit of 32" in lim.check(_req("a", 30, 5))
    assert "raise kv_cache.num_blocks" in lim.check(_req("b", 10, 10))
    assert lim.check(_req("c", 10, 6)) is None
