"""Orchestrates a benchmark: every system, workload and rate on the same checkpoint, ranks,
cores and dtype, one after another in one run; results as JSON records and plots."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from amoe_serve.bench.bench_config import BenchConfig
from amoe_serve.bench.bench_placement import plan_bench_placement
from amoe_serve.bench.driver import run_point
from amoe_serve.bench.metrics import latency_fields, rank_fields
from amoe_serve.bench.roofline import best_gemm_flops, run_flops
from amoe_serve.bench.workloads import make_requests
from amoe_serve.config import AmoeConfig, load_config
from amoe_serve.bench.goodput import goodput_table, request_goodput
from amoe_serve.bench.hf_baseline import hf_threads, run_hf
from amoe_serve.bench.report import write_report
from amoe_serve.bench.sim_check import sim_check
from amoe_serve.bench.vllm_baseline import VllmSystem, VllmUnavailable
from amoe_serve.default_model import write_default_model
from amoe_serve.model import load_spec


def bench_model_path(cfg: BenchConfig, cache: Path) -> str:
    if cfg.model.path:
        return cfg.model.path
    m = cfg.model
    name = (f"bench-d{m.hidden_size}-f{m.intermediate_size}-b{m.num_blocks}-e{m.num_experts}-k{m.top_k}"
            f"-h{m.num_heads}x{m.head_dim}-g{m.num_kv_heads}-v{m.vocab_size}-s{m.seed}")
    out = cache / name
    if not (out / "config.json").exists():
        print(f"[bench] writing the bench model to {out}", file=sys.stderr, flush=True)
        tmp = cache / (name + ".tmp")
        write_default_model(tmp, {"hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
                                  "num_hidden_layers": m.num_blocks, "num_local_experts": m.num_experts,
                                  "num_experts_per_tok": m.top_k, "num_attention_heads": m.num_heads,
                                  "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim,
                                  "vocab_size": m.vocab_size}, seed=m.seed)
        tmp.rename(out)
    return str(out)


def dataplane_config(cfg: BenchConfig, system: str, path: str, placement: Optional[Path] = None) -> AmoeConfig:
    r = cfg.routing
    placed = [f"deployment.placement={placement}"] if placement is not None else []
    over = [*placed, f"model.path={path}", f"deployment.mode={system}",
            f"deployment.attention_ranks={cfg.attention_ranks}", f"deployment.expert_ranks={cfg.expert_ranks}",
            f"routing.mode={r.mode}", f"routing.rate={r.rate}", f"routing.top_k={r.top_k}", f"routing.seed={r.seed}",
            "runtime.device=cpu", *cfg.dataplane, *(cfg.aep if system == "aep" else cfg.lockstep)]
    return load_config(None, over)


def baseline_top_k(cfg: BenchConfig, spec) -> int | None:
    """The top-k hf-transformers and vllm run the checkpoint's router at, when it is not the
    checkpoint's own: the data plane's (routing.top_k with the exponential skew), so that every
    system does the same expert FLOPs per token. None: the checkpoint's own."""
    r = cfg.routing
    k = (r.top_k or spec.top_k) if r.mode == "exponential" else spec.top_k
    return k if cfg.baselines_match_top_k and k != spec.top_k else None


def hf_batch_sizes(cfg: BenchConfig) -> list[int]:
    return [cfg.hf_batch_size] if cfg.hf_batch_size is not None else list(cfg.hf_batch_sizes)


def write_results(output: Path, cfg: BenchConfig, records: list[dict], skipped: dict[str, str]) -> dict:
    """results.json: the point records, the goodput table at the config's SLO, and the systems
    that were skipped, with why."""

    doc = {"slo": asdict(cfg.slo), "records": records,
           "goodput": goodput_table(records, cfg.slo.itl_p50_ms, cfg.slo.ttft_p99_ms),
           "skipped": [{"system": s, "reason": why} for s, why in skipped.items()]}
    (output / "results.json").write_text(json.dumps(doc, indent=1))
    return doc


def run_bench(cfg: BenchConfig, output: Path, cache: Path) -> list[dict]:
    output.mkdir(parents=True, exist_ok=True)
    path = bench_model_path(cfg, cache)
    spec = load_spec(path)
    gemm = best_gemm_flops(spec.hidden_size, spec.expert_intermediate_size)
    print(f"[bench] best single-core GEMM rate for [512x{spec.hidden_size}]x[{spec.hidden_size}x"
          f"{spec.expert_intermediate_size}]: {gemm / 1e9:.1f} GFLOP/s", file=sys.stderr, flush=True)
    records: list[dict] = []
    skipped: dict[str, str] = {}
    offline: dict[str, list] = {}
    poisson: dict[str, dict[float, list]] = {}  # the sim check replays these arrival times
    # Planned before any point (and before vLLM takes memory): AEP and lockstep serve with it.
    placement = None
    if {"aep", "lockstep"} & set(cfg.systems):
        placement = plan_bench_placement(cfg.placement, dataplane_config(cfg, "aep", path), output, cfg.workloads[0],
                                         cfg.placement_trace_requests, cfg.seed + 1, cfg.replica_slots)
    top_k = baseline_top_k(cfg, spec)
    base_k = top_k or spec.top_k  # the baselines' experts per token
    vllm = None
    if "vllm" in cfg.systems:
        vllm = VllmSystem(cfg.vllm, path, spec.head_dim, cfg.num_requests, top_k, output)
        if vllm.reason:
            skipped["vllm"] = vllm.reason
            print(f"[bench] vllm: skipped: {vllm.reason}", file=sys.stderr, flush=True)
    try:
        for workload in cfg.workloads:
            for rate in cfg.request_rates:
                reqs = make_requests(workload, cfg.num_requests, rate, spec.vocab_size, cfg.seed)
                if rate == 0:
                    offline[workload] = reqs
                else:
                    poisson.setdefault(workload, {})[rate] = reqs
                n_in = sum(len(r.prompt_token_ids) for r in reqs)
                n_out = sum(r.max_tokens for r in reqs)
                mean_ctx = sum(len(r.prompt_token_ids) + r.max_tokens / 2 for r in reqs) / len(reqs)
                # hf-transformers and vllm run every token through every block with the
                # checkpoint's router at base_k experts per token.
                base_flops = run_flops(spec, (n_in + n_out) * spec.num_blocks,
                                       (n_in + n_out) * spec.num_blocks * base_k, n_out, mean_ctx)
                for system in cfg.systems:
                    if system in skipped:
                        continue
                    label = f"{system} {workload} rate={rate or 'offline'}"
                    rec = {"system": system, "workload": workload, "request_rate": rate,
                           "num_requests": len(reqs), "input_tokens": n_in}
                    t0 = time.perf_counter()
                    if system == "hf-transformers":
                        if rate > 0:
                            continue  # generate has no continuous batching: offline only
                        threads = hf_threads()
                        h = run_hf(path, reqs, hf_batch_sizes(cfg), threads, top_k=top_k, dtype=cfg.hf_dtype)
                        wall, cores = h["wall_s"], threads
                        rec.update(output_tokens=h["output_tokens"], hf_batch_size=h["batch_size"],
                                   hf_sweep=h["sweep"], top_k=base_k, hf_dtype=h["dtype"], hf_load_s=h["load_s"],
                                   hf_memory_mb=h["memory"],
                                   ttft_ms_p50=None, ttft_ms_p99=None, itl_ms_p50=None, itl_ms_p99=None,
                                   mean_expert_batch=None, idle_fraction=None)
                        flops = base_flops
                    elif system == "vllm":
                        try:
                            p = vllm.run_point(reqs, label, cfg.point_timeout_s)
                        except Exception as e:  # a baseline that cannot run is recorded, not fatal
                            why = str(e) if isinstance(e, VllmUnavailable) else f"{type(e).__name__}: {e}"
                            skipped["vllm"] = why
                            print(f"[bench] vllm: skipped: {why}", file=sys.stderr, flush=True)
                            continue
                        failed = [t.error for t in p.traces if t.error]
                        wall = p.wall_s
                        rec.update(output_tokens=sum(len(t.token_s) for t in p.traces), failed_requests=len(failed),
                                   errors=failed[:3], **latency_fields(p.traces),
                                   **request_goodput(p.traces, cfg.slo.ttft_p99_ms, cfg.slo.itl_p50_ms, wall),
                                   mean_expert_batch=None, idle_fraction=None, top_k=base_k,
                                   vllm_max_num_seqs=vllm.max_num_seqs, **p.stats)
                        cores = len(os.sched_getaffinity(0))
                        flops = base_flops
                    else:
                        dp = dataplane_config(cfg, system, path, placement)
                        p = run_point(dp, reqs, label, cfg.point_timeout_s)
                        failed = [t.error for t in p.traces if t.error]
                        wall = p.wall_s
                        got = sum(len(t.token_s) for t in p.traces)
                        rec.update(output_tokens=got, failed_requests=len(failed), errors=failed[:3],
                                   **latency_fields(p.traces),
                                   **request_goodput(p.traces, cfg.slo.ttft_p99_ms, cfg.slo.itl_p50_ms, wall),
                                   **rank_fields(p.stats), placement=cfg.placement if placement else "contiguous")
                        cores = min(len(os.sched_getaffinity(0)),
                                    dp.deployment.attention_ranks + dp.deployment.expert_ranks)
                        flops = run_flops(spec, rec["attention_tokens"], rec["expert_rows"], got, mean_ctx)
                    rec["wall_s"] = wall
                    rec["output_tokens_per_s"] = rec["output_tokens"] / wall if wall > 0 else None
                    rec["roofline_fraction"] = flops / wall / (gemm * cores) if wall > 0 else None
                    rec["cores"] = cores
                    rec["bench_seconds"] = time.perf_counter() - t0
                    records.append(rec)
                    extra = f", batch {rec['hf_batch_size']}" if system == "hf-transformers" else ""
                    print(f"[bench] {label}: {rec['output_tokens_per_s']:.1f} tok/s{extra}, "
                          f"ITL p50 {rec.get('itl_ms_p50') or float('nan'):.1f} ms, "
                          f"expert batch {rec.get('mean_expert_batch') or float('nan'):.1f}", file=sys.stderr, flush=True)
                    write_results(output, cfg, records, skipped)
    finally:
        if vllm is not None:
            vllm.close()
    checks = []
    if cfg.sim_check and {"aep", "lockstep"} <= set(cfg.systems):
        checks = sim_check(records, dataplane_config(cfg, "aep", path, placement), spec, path, output, offline, poisson,
                           (cfg.slo.itl_p50_ms, cfg.slo.ttft_p99_ms))
    meta = {"config": asdict(cfg), "model_path": path, "gemm_flops_per_core": gemm}
    (output / "bench_meta.json").write_text(json.dumps(meta, indent=1, default=str))
    doc = write_results(output, cfg, records, skipped)
    write_report(records, output, checks, goodput=doc["goodput"], skipped=doc["skipped"], slo=doc["slo"])
    return records
