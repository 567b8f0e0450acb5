"""The Expert Buffering sweep, tiny: everything resident hits always; one slot with skewed
top-2 routing must miss; the table, JSON and plot are written."""

import json

import pytest

from amoe_serve.bench.buffer import bench_model, main

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_local_experts": 4,
        "num_experts_per_tok": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 300}


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_buffer_sweep_tiny(tmp_path):
    model = bench_model(tmp_path / "cache", TINY)
    out = tmp_path / "out"
    # 2 expert ranks x (2 blocks x 2 experts): S=4 holds everything.
    assert main(["--model", model, "--slots", "1", "4", "--eviction", "lifo", "--no-prefetch", "lifo",
                 "--rate", "1.0", "--requests", "4", "--max-tokens", "4", "--repeats", "1", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    recs = doc["records"]
    by = {(r["slots"], r["prefetch"]): r for r in recs}
    assert set(by) == {(0, None), (1, True), (4, True), (1, False), (4, False)}
    assert all(r["output_tokens"] == 16 for r in recs)
    for pf in (True, False):
        full, one = by[(4, pf)], by[(1, pf)]
        assert full["held_per_rank"] == [4, 4]
        assert full["hit_rate"] == 1.0 and full["misses"] == 0 and full["loads"] == 0
        assert one["misses"] > 0 and one["hit_rate"] < 1 and one["loads"] >= one["misses"]
    assert by[(1, False)]["prefetches"] == 0
    md = (out / "results.md").read_text()
    assert md.startswith("| S (slots/rank) | eviction |") and md.count("\n") == 2 + len(recs)
    assert "tokens/s (range)" in md
    assert (out / "buffer.png").stat().st_size > 0
    # Replay of one recorded trace: every policy, and Belady's optimum, which none beats.
    rep = {(r["slots"], r["eviction"]): r for r in doc["replay"]}
    assert set(rep) == {(s, e) for s in (1, 4) for e in ("lifo", "lru", "fifo", "belady")}
    assert all(rep[(4, e)]["hit_rate"] == 1.0 for e in ("lifo", "lru", "fifo", "belady"))
    assert rep[(1, "lifo")]["misses"] > 0
    assert all(rep[(1, "belady")]["hits"] >= rep[(1, e)]["hits"] for e in ("lifo", "lru", "fifo"))
    assert (out / "replay.md").read_text().startswith("| S (slots/rank) | lifo hit rate |")
