"""`amoe-serve place-bench`: placement policies end to end, the way the papers evaluate them.

1. Record a routing trace of the bench deployment (same model, ranks and routing skew).
2. Plan every policy on the trace's first half; evaluate offline on the second half.
3. Serve the bench workload through the AEP data plane once per placement and measure output
   tokens/s and the expert ranks' real load (rows and busy seconds per rank).

Timings come from one run on one machine: compare policies within a run, never across runs.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from amoe_serve.bench.bench_config import BenchModelConfig
from amoe_serve.config import ConfigError, RoutingConfig, merge_structured
from amoe_serve.bench.bench_config import BenchConfig
from amoe_serve.bench.driver import run_point
from amoe_serve.bench.run import bench_model_path
from amoe_serve.bench.trace_record import record_trace
from amoe_serve.bench.workloads import WORKLOADS, make_requests
from amoe_serve.config import load_config
from amoe_serve.model import load_spec
from amoe_serve.placement.evaluate import evaluate
from amoe_serve.placement.policies import POLICIES, plan
from amoe_serve.placement.trace import Trace


@dataclass
class PlaceBenchConfig:
    model: BenchModelConfig = field(default_factory=BenchModelConfig)
    attention_ranks: int = 1
    expert_ranks: int = 2
    routing: RoutingConfig = field(default_factory=lambda: RoutingConfig(
        mode="exponential", rate=1.0, top_k=1, seed=0, affinity=0.5, trace_window_tokens=256))
    policies: list[str] = field(default_factory=lambda: ["contiguous", "greedy", "ilp", "replicate"])
    # Extra expert slots per rank for `replicate` (0: one per block on every rank).
    replica_slots: int = 0
    ilp_time_limit_s: float = 60.0
    # Requests recorded for the trace, then requests served per placement.
    workload: str = "short"
    trace_requests: int = 64
    num_requests: int = 64
    # Data-plane overrides for every placement run (batching limits etc.).
    dataplane: list[str] = field(default_factory=list)
    seed: int = 0
    point_timeout_s: float = 900.0


def load_place_bench_config(path: Optional[str], overrides: Optional[list[str]] = None) -> PlaceBenchConfig:
    cfg: PlaceBenchConfig = merge_structured(PlaceBenchConfig, path, overrides, "place-bench configuration")
    bad = [p for p in cfg.policies if p not in POLICIES]
    if bad:
        raise ConfigError(f"place-bench policies {bad}: expected some of {', '.join(POLICIES)}")
    if cfg.workload not in WORKLOADS:
        raise ConfigError(f"place-bench workload {cfg.workload!r}: expected one of {', '.join(WORKLOADS)}")
    if cfg.trace_requests < 2 or cfg.num_requests < 1:
        raise ConfigError("place-bench: trace_requests must be >= 2 and num_requests >= 1")
    return cfg


def _dataplane(cfg: PlaceBenchConfig, path: str, placement: Optional[Path]):
    r = cfg.routing
    over = [f"model.path={path}", "deployment.mode=aep", f"deployment.attention_ranks={cfg.attention_ranks}",
            f"deployment.expert_ranks={cfg.expert_ranks}", f"routing.mode={r.mode}", f"routing.rate={r.rate}",
            f"routing.top_k={r.top_k}", f"routing.seed={r.seed}", f"routing.affinity={r.affinity}",
            f"routing.trace_window_tokens={r.trace_window_tokens}", "runtime.device=cpu", *cfg.dataplane]
    if placement is not None:
        over.append(f"deployment.placement={placement}")
    return load_config(None, over)


def measured_rank_load(stats: dict) -> dict:
    """Expert ranks' real work in a run: rows computed and busy seconds, max over mean."""
    ranks = [r for r in stats.get("ranks", {}).values() if r.get("role") == "expert"]
    rows = np.array([r.get("total_tokens", 0) for r in ranks], dtype=float)
    busy = np.array([r.get("busy_s", 0.0) for r in ranks], dtype=float)
    ratio = lambda x: float(x.max() / x.mean()) if len(x) and x.mean() > 0 else None
    return {"rank_rows": rows.astype(int).tolist(), "rank_busy_s": busy.round(3).tolist(),
            "rows_max_over_mean": ratio(rows), "busy_max_over_mean": ratio(busy)}


def run_place_bench(cfg: PlaceBenchConfig, out: Path, cache: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    path = bench_model_path(BenchConfig(model=cfg.model), cache)
    spec = load_spec(path)
    trace_path = out / "trace.json"
    print(f"[place-bench] recording a trace of {cfg.trace_requests} {cfg.workload} requests", file=sys.stderr)
    record_trace(_dataplane(cfg, path, None), trace_path, None, cfg.workload, cfg.trace_requests, cfg.seed)
    plan_half, eval_half = Trace.load(trace_path).halves()

    reqs = make_requests(cfg.workload, cfg.num_requests, 0.0, spec.vocab_size, cfg.seed + 1)
    records: list[dict] = []
    for policy in cfg.policies:
        place, info = plan(policy, plan_half, cfg.expert_ranks, cfg.ilp_time_limit_s,
                           cfg.replica_slots or None)
        place_path = out / f"placement-{policy}.json"
        place_path.write_text(place.to_json(policy=policy, meta={"plan": info}))
        rec = {"policy": policy, "plan": info, "held_out": evaluate(place, eval_half),
               "planned_on_tokens": plan_half.tokens, "evaluated_on_tokens": eval_half.tokens}
        label = f"aep placement={policy}"
        p = run_point(_dataplane(cfg, path, place_path), reqs, label, cfg.point_timeout_s)
        failed = [t.error for t in p.traces if t.error]
        got = sum(len(t.token_s) for t in p.traces)
        rec.update(output_tokens=got, failed_requests=len(failed), errors=failed[:3], wall_s=p.wall_s,
                   output_tokens_per_s=got / p.wall_s if p.wall_s > 0 else None, **measured_rank_load(p.stats))
        records.append(rec)
        print(f"[place-bench] {policy}: {rec['output_tokens_per_s']:.1f} tok/s, measured expert-rank rows "
              f"max/mean {rec['rows_max_over_mean']:.3f}", file=sys.stderr, flush=True)
        (out / "results.json").write_text(json.dumps(records, indent=1, default=str))
    (out / "place_bench_meta.json").write_text(json.dumps({"config": asdict(cfg), "model_path": path},
                                                           indent=1, default=str))
    write_place_report(records, out)
    return records


def _held(r: dict, key: str):
    return r["held_out"].get(key)


def place_table(records: list[dict]) -> str:
    base = next((r for r in records if r["policy"] == "contiguous"), None)
    f = lambda x, p=3: "-" if x is None else f"{x:.{p}f}"
    rows = ["| policy | held-out max/mean rank load | held-out cross-rank traffic | replicas | "
            "tokens/s | vs contiguous | measured rows max/mean | measured busy max/mean |",
            "|---|---|---|---|---|---|---|---|"]
    for r in records:
        rel = (r["output_tokens_per_s"] / base["output_tokens_per_s"]
               if base and base.get("output_tokens_per_s") else None)
        rows.append(f"| {r['policy']} | {f(_held(r, 'max_over_mean'))} | {f(_held(r, 'cross_rank_fraction'))} | "
                    f"{_held(r, 'replicas') or 0} | {f(r['output_tokens_per_s'], 1)} | {f(rel, 2)}x | "
                    f"{f(r['rows_max_over_mean'])} | {f(r['busy_max_over_mean'])} |")
    return "\n".join(rows) + "\n"


def write_place_report(records: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "results.md").write_text(place_table(records))
    names = [r["policy"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [("held-out max/mean rank load", [_held(r, "max_over_mean") or 0 for r in records]),
              ("measured expert-rank rows max/mean", [r["rows_max_over_mean"] or 0 for r in records]),
              ("output tokens/s (AEP)", [r["output_tokens_per_s"] or 0 for r in records])]
    for ax, (title, ys) in zip(axes, panels):
        ax.bar(names, ys, color="tab:blue")
        ax.set_title(title)
        if "max/mean" in title:
            ax.axhline(1.0, color="grey", ls="--", lw=0.8)
    fig.tight_layout()
    fig.savefig(out / "place_bench.png", dpi=110)
    plt.close(fig)
