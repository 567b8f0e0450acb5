"""Turns traces and rank counters into the records of results.json."""

from __future__ import annotations

import numpy as np


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def latency_fields(traces) -> dict:
    ttft = [(t.token_s[0] - t.submit_s) * 1e3 for t in traces if t.token_s]
    itl = [(b - a) * 1e3 for t in traces for a, b in zip(t.token_s, t.token_s[1:])]
    return {"ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99)}


def rank_fields(stats: dict) -> dict:
    ranks = stats.get("ranks", {}).values()
    experts = [r for r in ranks if r.get("role") == "expert"]
    attn = [r for r in ranks if r.get("role") == "attention"]
    tok = sum(r.get("total_tokens", 0) for r in experts)
    bat = sum(r.get("total_batches", 0) for r in experts)
    hist: dict[str, int] = {}
    for r in experts:
        for k, v in r.get("batch_hist", {}).items():
            hist[k] = hist.get(k, 0) + v
    # tokens per global expert: expert ranks report tokens per (block, local slot) and which
    # global expert each slot is.
    per_expert: dict[int, int] = {}
    for r in experts:
        for b, row in enumerate(r.get("tokens_per_layer", [])):
            for s, n in enumerate(row):
                ids = r.get("experts", [])
                if b < len(ids) and s < len(ids[b]):
                    per_expert[ids[b][s]] = per_expert.get(ids[b][s], 0) + n
    busy = [r.get("idle_fraction") for r in [*attn, *experts] if r.get("idle_fraction") is not None]
    a_tok = sum(r.get("total_tokens", 0) for r in attn)
    a_bat = sum(r.get("total_batches", 0) for r in attn)
    bufs = [r["expert_buffer"] for r in experts if "expert_buffer" in r]
    used = sum(b["hits"] + b["misses"] for b in bufs)
    return {"mean_expert_batch": tok / bat if bat else None,
            "expert_buffer_hit_rate": sum(b["hits"] for b in bufs) / used if used else None,
            "mean_attention_batch": a_tok / a_bat if a_bat else None,
            "idle_fraction": float(np.mean(busy)) if busy else None,
            "expert_rows": tok, "attention_tokens": a_tok,
            "expert_batch_hist": hist, "tokens_per_expert": {str(k): v for k, v in sorted(per_expert.items())},
            "rank_idle": {str(r["rank"]): r.get("idle_fraction") for r in [*attn, *experts] if "rank" in r},
            "rank_overhead": {str(r["rank"]): rank_overhead(r) for r in [*attn, *experts] if "rank" in r},
            "rank_memory_mb": {str(r["rank"]): {"role": r.get("role"), **r["memory"]}
                               for r in [*attn, *experts] if "rank" in r and "memory" in r}}


def rank_overhead(r: dict) -> dict:
    """Per rank: steps (executed batches) per busy second, µs of host work per step, the
    process's CPU seconds in its loop (the busy time counts wall time, which includes time the
    rank lost to others sharing its core), and the transport's µs per message sent / received
    (packing, posting, probing, unpacking)."""
    steps, busy = r.get("total_batches", 0), r.get("busy_s", 0.0)
    link = r.get("link", {})
    return {"role": r.get("role"), "steps": steps, "busy_s": busy,
            "wall_s": busy + r.get("idle_s", 0.0),
            "us_per_step": busy / steps * 1e6 if steps else None,
            "steps_per_s": steps / (busy + r.get("idle_s", 0.0)) if steps else None,
            "cpu_s": r.get("cpu_s"),
            "msgs_sent": link.get("sent"), "msgs_received": link.get("received"),
            "us_per_msg_sent": link.get("send_us_per_msg"), "us_per_msg_received": link.get("recv_us_per_msg")}
