"""Offline evaluation of placements on a routing trace, and plan-on-one-half / evaluate-on-the-other
comparisons of the policies (`amoe-serve place-eval`).

Dispatch model (as in the data plane): a replicated expert's rows are split evenly over its
ranks, so each of its m ranks gets load/m, and a transition i@b -> j@b+1 goes from each rank of
i to each rank of j with probability 1/(m_i * m_j); the traffic figures are expectations.

Legend: B blocks, E experts per block, R expert ranks, L = B-1 block boundaries.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from amoe_serve.placement.layout import Placement
from amoe_serve.placement.policies import POLICIES, cost_matrix, plan
from amoe_serve.placement.trace import Trace


def share_BER(placement: Placement) -> np.ndarray:
    """share_BER[b, e, r]: fraction of expert e's rows (block b) that rank r serves."""
    B = len(placement.rank_BE)
    E = len(placement.rank_BE[0]) if B else 0
    out = np.zeros((B, E, placement.expert_ranks))
    for b in range(B):
        for e in range(E):
            ranks = placement.ranks_of(b, e)
            out[b, e, list(ranks)] = 1.0 / len(ranks)
    return out


def evaluate(placement: Placement, trace: Trace, bandwidth: Any = None) -> dict:
    """Load balance, cross-rank traffic and memory of `placement` on `trace`."""
    B, E, R = trace.num_blocks, trace.num_experts, placement.expert_ranks
    placement.validate(B, E)
    s_BER = share_BER(placement)
    load_BE = trace.load_BE.astype(np.float64)
    trans_LEE = trace.trans_LEE.astype(np.float64)
    load_BR = np.einsum("be,ber->br", load_BE, s_BER)
    mean_B = load_BR.sum(axis=1) / R
    max_B = load_BR.max(axis=1)
    busy_B = mean_B > 0              # blocks that saw no tokens have no balance to speak of
    ratio_B = np.where(busy_B, max_B / np.where(busy_B, mean_B, 1.0), 1.0)
    differ_RR = cost_matrix(R)       # 1 off the diagonal: counts rank changes
    cost_RR = cost_matrix(R, bandwidth)
    cross = cost = 0.0
    for l in range(trans_LEE.shape[0]):
        # flow_RR[r, s]: expected transitions from rank r (block l) to rank s (block l+1).
        flow_RR = s_BER[l].T @ trans_LEE[l] @ s_BER[l + 1]
        cross += float((flow_RR * differ_RR).sum())
        cost += float((flow_RR * cost_RR).sum())
    total = float(trans_LEE.sum())
    memory_R = (s_BER > 0).sum(axis=(0, 1))
    return {
        "blocks": B, "experts": E, "ranks": R, "tokens": trace.tokens,
        "load_BR": load_BR.tolist(),
        "max_over_mean_B": ratio_B.tolist(),
        "max_over_mean": float(ratio_B[busy_B].mean()) if busy_B.any() else 1.0,
        "max_over_mean_worst": float(ratio_B.max(initial=1.0)),
        "max_load_sum": float(max_B.sum()),
        "transitions": total,
        "cross_rank_transitions": cross,
        "cross_rank_fraction": cross / total if total else 0.0,
        "traffic_cost": cost,
        "memory_R": memory_R.astype(int).tolist(),
        "memory_max": int(memory_R.max(initial=0)),
        "replicas": placement.num_replicas,
    }


SUMMARY_KEYS = ("max_over_mean", "max_over_mean_worst", "max_load_sum", "cross_rank_fraction",
                "cross_rank_transitions", "traffic_cost", "memory_max", "replicas")


def summary(ev: dict) -> dict:
    """The scalar figures of an evaluate() result."""
    return {k: ev[k] for k in SUMMARY_KEYS}


def plan_and_evaluate(trace: Trace, ranks: int, policies: Iterable[str] = POLICIES,
                      out_dir: Optional[str | Path] = None, time_limit: float = 60.0,
                      replica_slots: Optional[int] = None, bandwidth: Any = None,
                      progress: bool = False) -> dict:
    """Plan every policy on the first half of the trace (by windows), evaluate on the second half.
    With out_dir: writes results.json, results.md and place_eval.png there."""
    plan_t, eval_t = trace.halves()
    rows = []
    for policy in policies:
        t0 = time.perf_counter()
        placement, info = plan(policy, plan_t, ranks, time_limit=time_limit, replica_slots=replica_slots,
                               bandwidth=bandwidth, progress=progress)
        secs = time.perf_counter() - t0
        held_out = evaluate(placement, eval_t, bandwidth)
        rows.append({"policy": policy, "plan_seconds": secs, "held_out": summary(held_out),
                     "planning_half": summary(evaluate(placement, plan_t, bandwidth)),
                     "memory_R": held_out["memory_R"], "note": _note(info), "info": info,
                     "placement": placement.to_dict(policy)})
    result = {"ranks": ranks, "blocks": trace.num_blocks, "experts": trace.num_experts, "top_k": trace.top_k,
              "windows": [plan_t.num_windows, eval_t.num_windows], "tokens": [plan_t.tokens, eval_t.tokens],
              "bandwidth": None if bandwidth is None else np.asarray(bandwidth, dtype=float).tolist(),
              "rows": rows}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1))
        (out / "results.md").write_text(markdown_table(result))
        plot(result, out / "place_eval.png")
    return result


def _note(info: dict) -> str:
    if info.get("policy") == "ilp":
        if info.get("fallback"):
            return f"fallback: {info['fallback']}"
        s1, s2 = info.get("stage1", {}), info.get("stage2", {})
        return (f"stage 1 optimal in {s1.get('blocks_proven_optimal')}/{len(s1.get('status_B', []))} blocks; "
                f"stage 2 {s2.get('method')} ({s2.get('status')}), kept {s2.get('source')}")
    if info.get("policy") == "replicate":
        return f"{info['replicas_added']} replicas ({info['method']}), {info['replica_slots']} slots/rank"
    return ""


def markdown_table(result: dict) -> str:
    lines = [f"Planned on the first {result['windows'][0]} windows ({result['tokens'][0]} tokens), evaluated "
             f"on the last {result['windows'][1]} ({result['tokens'][1]} tokens); {result['blocks']} blocks x "
             f"{result['experts']} experts, top-{result['top_k']}, {result['ranks']} expert ranks.", "",
             "| policy | max/mean load (mean over blocks) | max/mean (worst block) | cross-rank transitions "
             "| traffic cost | experts/rank (max) | replicas | plan s | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        h = r["held_out"]
        lines.append(f"| {r['policy']} | {h['max_over_mean']:.3f} | {h['max_over_mean_worst']:.3f} | "
                     f"{h['cross_rank_fraction']:.1%} | {h['traffic_cost']:.0f} | {h['memory_max']} | "
                     f"{h['replicas']} | {r['plan_seconds']:.2f} | {r['note']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["policy"] for r in result["rows"]]
    x = np.arange(len(names))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(6.0, 2.2 * len(names)), 3.6))
    ax1.bar(x, [r["held_out"]["max_over_mean"] for r in result["rows"]], color="tab:blue",
            label="mean over blocks")
    ax1.plot(x, [r["held_out"]["max_over_mean_worst"] for r in result["rows"]], "k_", markersize=18,
             label="worst block")
    ax1.axhline(1.0, color="grey", linewidth=0.8)
    ax1.set_ylabel("max / mean rank load")
    ax1.legend(fontsize=8)
    ax2.bar(x, [100 * r["held_out"]["cross_rank_fraction"] for r in result["rows"]], color="tab:orange")
    ax2.set_ylabel("cross-rank transitions (%)")
    for ax in (ax1, ax2):
        ax.set_xticks(x, names)
    fig.suptitle(f"held-out half: {result['blocks']} blocks x {result['experts']} experts on "
                 f"{result['ranks']} ranks", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
