"""Expert Buffering sweep: hit rate, loads and throughput against the number of resident expert
slots S and the eviction policy, on a skewed workload through in-process ranks.

    python -m amoe_serve.bench.buffer --slots 1 2 4 8 16 --eviction lifo lru fifo --out docs/bench/buffer/

Every point runs the same requests (offline: all submitted at once) through a fresh data plane
(1 attention + 2 expert ranks as threads, AEP by default) on the same small random Mixtral-shaped
checkpoint, with the AMoE paper's exponential routing skew. One unbuffered point (every expert
resident, the plain ExpertSide) is the reference. Writes results.json, results.md, buffer.png.
tokens/s is timed around the requests only (after a one-request warm-up, so rank start-up is
out of it); the counters include the warm-up.

Legend: S resident slots per expert rank, H experts held per expert rank.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Optional

from amoe_serve.config import load_config
from amoe_serve.requests_io import GenerateRequest
from amoe_serve.sampler import SamplingParams
from amoe_serve.default_model import write_default_model
from amoe_serve.engine.inproc import inproc_job
from amoe_serve.model import load_spec
from amoe_serve.model.expert_buffer import replay

# Small enough that the whole default sweep takes a few minutes on 2 cores, big enough that
# an expert load (3 x 512 x 1408 fp32 = 8.7 MB) is not free.
MODEL = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4, "num_local_experts": 8,
         "num_experts_per_tok": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
         "vocab_size": 1024}


def bench_model(cache: Path, shape: dict = MODEL) -> str:
    name = "buffer-" + "-".join(f"{v}" for v in shape.values())
    out = cache / name
    if not (out / "config.json").exists():
        tmp = cache / (name + ".tmp")
        write_default_model(tmp, shape, seed=0)
        tmp.rename(out)
    return str(out)


def make_requests(n: int, max_tokens: int, vocab: int, seed: int) -> list[GenerateRequest]:
    rng = random.Random(seed)
    return [GenerateRequest(f"r{i}", [rng.randrange(3, vocab) for _ in range(rng.randint(16, 48))],
                            SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for i in range(n)]


def run_point(path: str, slots: int, eviction: str, prefetch: bool, args, traces: Optional[list] = None) -> dict:
    """One data plane, one S/policy: throughput and the expert ranks' summed buffer counters.
    traces: a list that gets (pairs, access trace) of each expert rank's store."""

    cfg = load_config(None, [f"model.path={path}", f"deployment.mode={args.mode}",
                             "deployment.attention_ranks=1", "deployment.expert_ranks=2",
                             "routing.mode=exponential", f"routing.rate={args.rate}", f"routing.top_k={args.top_k}",
                             f"expert_buffer.slots={slots}", f"expert_buffer.eviction={eviction if slots else 'lifo'}",
                             f"expert_buffer.prefetch={prefetch}", f"expert_buffer.record_accesses={traces is not None}",
                             "runtime.device=cpu"])
    spec = load_spec(path)
    with inproc_job(cfg, join_s=30) as gw:
        gw.run([GenerateRequest("warmup", [5, 6, 7, 8], SamplingParams(max_tokens=2, ignore_eos=True))],
               timeout=args.timeout)
        reqs = make_requests(args.requests, args.max_tokens, spec.vocab_size, args.seed)
        t0, c0 = time.perf_counter(), time.process_time()
        gw.run(reqs, timeout=args.timeout)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out_tokens = sum(len(gw.results[r.id].output_token_ids) for r in reqs)
    experts = [s for s in gw.stats.values() if s.get("role") == "expert"]
    rec = {"slots": slots, "eviction": eviction if slots else "-", "prefetch": prefetch if slots else None,
           "held_per_rank": [sum(len(e) for e in s["experts"]) for s in experts],
           "requests": len(reqs), "output_tokens": out_tokens, "wall_s": wall, "tokens_per_s": out_tokens / wall,
           # CPU seconds of the whole process (every rank thread) per output token: less
           # sensitive than wall time to other jobs sharing the cores.
           "cpu_s": cpu, "cpu_ms_per_token": 1e3 * cpu / max(out_tokens, 1),
           "expert_busy_s": sum(s["busy_s"] for s in experts)}
    bufs = [s["expert_buffer"] for s in experts if "expert_buffer" in s]
    if traces is not None:  # each expert rank's recorded accesses, as (pairs, [[(b, e), ...] per step])
        traces.extend(([tuple(k) for k in b["pairs"]], [[tuple(k) for k in step] for step in b["accesses"]])
                      for b in bufs)
    if bufs:
        tot = {k: sum(b[k] for b in bufs) for k in ("hits", "misses", "loads", "prefetches", "evictions",
                                                   "load_s", "wait_s")}
        used = tot["hits"] + tot["misses"]
        rec.update(tot, hit_rate=tot["hits"] / used if used else 1.0,
                   overlap=1 - tot["wait_s"] / tot["load_s"] if tot["load_s"] > 0 else None)
    else:   # unbuffered: every expert resident
        rec.update(hits=None, misses=0, loads=0, prefetches=0, evictions=0, load_s=0.0, wait_s=0.0,
                   hit_rate=1.0, overlap=None)
    return rec


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def summarize(runs: dict, points: list) -> list[dict]:
    """Per point: the median-throughput run's record, every run's tokens/s and hit rate, and
    the median over rounds of tokens/s relative to the same round's unbuffered run."""
    base = runs.get((0, "-", True))
    out = []
    for p in points:
        rs = runs[p]
        if not rs:
            continue
        rec = dict(sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2])
        rec["tokens_per_s"] = _median([r["tokens_per_s"] for r in rs])
        rec["tokens_per_s_runs"] = [r["tokens_per_s"] for r in rs]
        rec["hit_rate_runs"] = [r["hit_rate"] for r in rs]
        rec["vs_unbuffered"] = (_median([r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(rs, base)])
                                if base else None)
        rec["cpu_ms_per_token"] = _median([r["cpu_ms_per_token"] for r in rs])
        rec["cpu_vs_unbuffered"] = (_median([r["cpu_ms_per_token"] / b["cpu_ms_per_token"] for r, b in zip(rs, base)])
                                    if base else None)
        out.append(rec)
    return out


def table(records: list[dict]) -> str:
    rows = ["| S (slots/rank) | eviction | prefetch | hit rate | misses | loads | evictions | load s | wait s "
            "| tokens/s (median) | tokens/s (range) | tokens/s vs unbuffered | CPU ms/token | CPU vs unbuffered |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda x, p=2: "-" if x is None else f"{x:.{p}f}"
    for r in records:
        rel = r.get("vs_unbuffered")
        runs = r.get("tokens_per_s_runs") or [r["tokens_per_s"]]
        s = "all (unbuffered)" if r["slots"] == 0 else str(r["slots"])
        pf = "-" if r["prefetch"] is None else ("on" if r["prefetch"] else "off")
        rows.append(f"| {s} | {r['eviction']} | {pf} | {f(r['hit_rate'], 3)} | {r['misses']} | {r['loads']} | "
                    f"{r['evictions']} | {f(r['load_s'])} | {f(r['wait_s'])} | {f(r['tokens_per_s'], 1)} | "
                    f"{f(min(runs), 1)}-{f(max(runs), 1)} | {f(rel)}x | {f(r.get('cpu_ms_per_token'), 1)} | "
                    f"{f(r.get('cpu_vs_unbuffered'))}x |")
    return "\n".join(rows) + "\n"


def replay_all(traces: list, slots: list[int]) -> list[dict]:
    """Every policy (and Belady's optimum) on the same recorded accesses, without prefetch:
    hit rates free of run-to-run scheduling differences."""

    rows = []
    for S in slots:
        for ev in ("lifo", "lru", "fifo", "belady"):
            hm = [replay(trace, pairs, S, ev) for pairs, trace in traces]
            hits, misses = sum(h for h, _ in hm), sum(m for _, m in hm)
            rows.append({"slots": S, "eviction": ev, "hits": hits, "misses": misses,
                         "hit_rate": hits / (hits + misses) if hits + misses else 1.0})
    return rows


def replay_table(rows: list[dict]) -> str:
    evs = ["lifo", "lru", "fifo", "belady"]
    out = ["| S (slots/rank) | " + " | ".join(f"{e} hit rate" for e in evs) + " |", "|---" * (1 + len(evs)) + "|"]
    for S in sorted({r["slots"] for r in rows}):
        by = {r["eviction"]: r for r in rows if r["slots"] == S}
        out.append(f"| {S} | " + " | ".join(f"{by[e]['hit_rate']:.3f}" for e in evs) + " |")
    return "\n".join(out) + "\n"


def plot(records: list[dict], out: Path, replayed: Optional[list[dict]] = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(17, 4.5))
    for ev, color in (("lifo", "tab:blue"), ("lru", "tab:orange"), ("fifo", "tab:green")):
        for pf, style in ((True, "-o"), (False, ":x")):
            pts = sorted((r["slots"], r["hit_rate"], r.get("cpu_vs_unbuffered") or 0.0) for r in records
                         if r["slots"] and r["eviction"] == ev and r["prefetch"] == pf)
            if pts:
                xs, hr, tps = zip(*pts)
                label = ev + ("" if pf else " (no prefetch)")
                a1.plot(xs, hr, style, color=color, label=label)
                a2.plot(xs, tps, style, color=color, label=label)
    a2.axhline(1.0, color="gray", ls="--", label="all resident (unbuffered)")
    styles = {"lifo": "tab:blue", "lru": "tab:orange", "fifo": "tab:green", "belady": "black"}
    for ev, color in styles.items():
        pts = sorted((r["slots"], r["hit_rate"]) for r in replayed or [] if r["eviction"] == ev)
        if pts:
            a3.plot(*zip(*pts), "-s" if ev != "belady" else "--", color=color, label=ev)
    a3.set_title("replay of one recorded trace (no prefetch)")
    a3.set_ylim(0, 1.02)
    for a, yl in ((a1, "hit rate"), (a2, "CPU s per token / unbuffered's (lower is better)"), (a3, "hit rate")):
        a.set_xscale("log", base=2)
        a.set_xlabel("S: resident expert slots per expert rank")
        a.set_ylabel(yl)
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    a1.set_ylim(0, 1.02)
    a1.set_title("expert buffer hit rate (live runs)")
    a2.set_title("cost per token (median over rounds)")
    fig.tight_layout()
    fig.savefig(out / "buffer.png", dpi=110)
    plt.close(fig)


def run_sweep(args) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = args.model or bench_model(Path(args.cache))
    points: list[tuple[int, str, bool]] = [(0, "-", True)] if args.baseline else []
    points += [(s, ev, True) for ev in args.eviction for s in args.slots]
    points += [(s, ev, False) for ev in args.no_prefetch for s in args.slots]
    meta = {"model": path, "mode": args.mode, "routing": {"mode": "exponential", "rate": args.rate,
            "top_k": args.top_k}, "requests": args.requests, "max_tokens": args.max_tokens,
            "repeats": args.repeats, "attention_ranks": 1, "expert_ranks": 2}
    # Rounds of every point, not repeats back to back: the machine is shared and its load
    # drifts, so each round's points see about the same background; medians over rounds.
    runs: dict[tuple[int, str, bool], list[dict]] = {p: [] for p in points}
    for rnd in range(args.repeats):
        for p in points:
            rec = run_point(path, *p, args)
            runs[p].append(rec)
            print(f"[buffer] round {rnd + 1}/{args.repeats} S={p[0] or 'all'} {p[1]} prefetch={'on' if p[2] else 'off'}: "
                  f"hit rate {rec['hit_rate']:.3f}, {rec['loads']} loads, {rec['tokens_per_s']:.1f} tok/s",
                  file=sys.stderr, flush=True)
        records = summarize(runs, points)
        (out / "results.json").write_text(json.dumps({"setup": meta, "records": records}, indent=1))
        (out / "results.md").write_text(table(records))
    # One run with everything resident (the buffer's no-cost path) records the accesses.
    traces: list = []
    run_point(path, 1 << 20, "lifo", False, args, traces)
    replayed = replay_all(traces, args.slots)
    doc = json.loads((out / "results.json").read_text())
    doc["replay"] = replayed
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    (out / "replay.md").write_text(replay_table(replayed))
    plot(records, out, replayed)
    return records


def parse(argv: Optional[list[str]] = None):
    p = argparse.ArgumentParser(prog="python -m amoe_serve.bench.buffer", description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--eviction", nargs="+", default=["lifo", "lru", "fifo"], choices=["lifo", "lru", "fifo"])
    p.add_argument("--no-prefetch", nargs="*", default=["lifo"], choices=["lifo", "lru", "fifo"],
                   help="policies also run with the background prefetch off (default: lifo)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the unbuffered (all resident) reference point")
    p.add_argument("--mode", default="aep", choices=["aep", "lockstep"])
    p.add_argument("--rate", type=float, default=0.5, help="exponential routing skew rate")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="rounds over all points; medians are reported")
    p.add_argument("--model", help="checkpoint folder (default: a small random Mixtral written to --cache)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "amoe-serve"))
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", default="docs/bench/buffer")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    records = run_sweep(args)
    print(table(records))
    print((Path(args.out) / "replay.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
