"""Per-rank overhead fields and their table (pure functions over rank stats)."""

from amoe_serve.bench.metrics import rank_fields, rank_overhead
from amoe_serve.bench.overhead import overhead_table


def _stats():
    link = {"sent": 10, "received": 20, "sent_bytes": 1000, "send_us_per_msg": 50.0, "recv_us_per_msg": 25.0}
    return {"ranks": {
        "1": {"rank": 1, "role": "attention", "total_batches": 100, "busy_s": 0.2, "idle_s": 0.3,
              "total_tokens": 6400, "idle_fraction": 0.6, "link": link, "cpu_s": 0.15},
        "2": {"rank": 2, "role": "expert", "total_batches": 400, "busy_s": 0.4, "idle_s": 0.1,
              "total_tokens": 3200, "idle_fraction": 0.2, "batch_hist": {"8": 400}}}}


def test_rank_overhead_per_step_and_per_message():
    o = rank_overhead(_stats()["ranks"]["1"])
    assert o["us_per_step"] == 2000.0 and o["steps_per_s"] == 200.0
    assert o["msgs_sent"] == 10 and o["us_per_msg_received"] == 25.0 and o["cpu_s"] == 0.15
    e = rank_overhead(_stats()["ranks"]["2"])
    assert e["us_per_step"] == 1000.0 and e["msgs_sent"] is None  # an old rank without link stats


def test_overhead_table_has_a_row_per_rank():
    rec = {"system": "aep", "request_rate": 0.0, "output_tokens": 3000, **rank_fields(_stats())}
    md = overhead_table([rec, {"system": "hf-transformers", "request_rate": 0.0}])
    rows = [line for line in md.splitlines() if line.startswith("| aep")]
    # CPU: 0.15 s over 100 steps and 3,000 output tokens; the expert reported none.
    assert len(rows) == 2 and "| 1 | attention | 200 | 2000 | 1500 | 50.0 | 0.60 | 10 | 50.0 | 20 | 25.0 |" in rows[0]
    assert "| 2 | expert | 800 | 1000 | - | - | 0.20 |" in rows[1]
    assert overhead_table([{"system": "hf-transformers"}]) == ""
