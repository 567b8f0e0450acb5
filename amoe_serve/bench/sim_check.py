"""Check the simulator against the bench: calibrate the local table in the same run (same
machine, same noise), simulate the bench's own deployment and requests, and compare the
predicted AEP/lockstep ratios with the measured ones: throughput at saturation (offline
points), and goodput at the bench's SLO (its Poisson points, the same arrival times)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from amoe_serve.bench.goodput import goodput_table
from amoe_serve.config import AmoeConfig, ConfigError
from amoe_serve.bench.bench_placement import sim_placement
from amoe_serve.engine.job import attention_threads, attention_waves
from amoe_serve.sim.calibrate import calibrate
from amoe_serve.sim.sim_config import load_sim_config
from amoe_serve.sim.engine import Workload
from amoe_serve.sim.run import run_one
from amoe_serve.slo import meets_slo


def sim_config_for(dp: AmoeConfig, spec, workload: str, num_requests: int, table_path: Path, cores: int,
                   arrival: str = "offline"):
    """The simulator's view of one bench point: same shape, ranks, limits, skew (the requests
    and their arrival times are passed to run_one)."""
    d, s, r = dp.deployment, dp.scheduler, dp.routing
    A, X = d.attention_ranks, d.expert_ranks
    placement, replicas = sim_placement(dp, spec.num_blocks, spec.num_experts)
    over = [f"model.hidden={spec.hidden_size}", f"model.ffn={spec.expert_intermediate_size}",
            f"model.num_blocks={spec.num_blocks}", f"model.num_experts={spec.num_experts}",
            f"model.top_k={r.top_k or spec.top_k}", f"model.num_heads={spec.num_heads}",
            f"model.num_kv_heads={spec.num_kv_heads}", f"model.head_dim={spec.head_dim}",
            f"model.vocab={spec.vocab_size}", f"model.dtype_bytes={2 if dp.model.dtype in ('bfloat16', 'float16') else 4}",
            f"cluster.gpus=[{A + X}]", f"cluster.attention_fraction={A / (A + X)}",
            f"cluster.device={table_path}", f"cluster.cores={cores}",
            f"workload.name={workload}", f"workload.arrival={arrival}", f"workload.num_requests={num_requests}",
            "workload.duration_s=0", "workload.warmup_s=0", "workload.warm_start=false",
            f"workload.skew_rate={r.rate}",
            "run.systems=[aep,lockstep]", f"run.policies=[{s.policy}]", f"run.lookahead={s.lookahead}",
            f"run.decay={s.decay}", f"run.max_running_requests={dp.engine.max_running_requests}",
            f"run.lockstep_max_running=[{dp.engine.max_running_requests}]",
            f"run.max_batch_tokens={dp.engine.max_batch_tokens}", f"run.max_expert_batch={s.max_expert_batch}",
            f"run.group_block={str(s.group_block).lower()}", f"run.attention_waves={attention_waves(dp)}",
            f"run.attention_max_wait_ms={s.attention_max_wait_ms}", "run.lockstep_layout=split",
            f"run.placement={placement}", f"run.replicas=[{replicas}]"]
    return load_sim_config(None, over)


def _workload(reqs, poisson: bool) -> Workload:
    import numpy as np
    arrivals = np.array([q.arrival_s for q in reqs]) if poisson else np.zeros(len(reqs))
    return Workload(arrivals, np.array([len(q.prompt_token_ids) for q in reqs]), np.array([q.max_tokens for q in reqs]))


def _goodput(workload: str, by_system: dict[str, dict[float, dict]], itl_ms: float,
             ttft_ms: float) -> dict[str, dict]:
    """{system: {tokens_per_s, request_rate}} by the bench's own rule (bench/goodput.py) on
    {system: {rate: point}}."""
    recs = [{**p, "system": s, "workload": workload, "request_rate": rate}
            for s, points in by_system.items() for rate, p in points.items()]
    return {g["system"]: {"tokens_per_s": g["goodput_tokens_per_s"], "request_rate": g["goodput_request_rate"]}
            for g in goodput_table(recs, itl_ms, ttft_ms)}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def goodput_check(records: list[dict], dp: AmoeConfig, spec, tables: dict[str, Path], cores: int, workload: str,
                  requests: dict[float, list], slo: tuple[float, float]) -> dict:
    """Predicted vs measured goodput of AEP and lockstep at the SLO (ITL p50, TTFT p99 ms) over
    the Poisson rates both ran, each rate simulated on the bench's own requests and arrival times."""
    itl_ms, ttft_ms = slo
    measured: dict[str, dict[float, dict]] = {"aep": {}, "lockstep": {}}
    for r in records:
        if r["workload"] == workload and r["request_rate"] > 0 and r["system"] in measured \
                and r["request_rate"] in requests:
            measured[r["system"]][r["request_rate"]] = r
    rates = sorted(set(measured["aep"]) & set(measured["lockstep"]))
    if not rates:
        return {}
    predicted: dict[str, dict[float, dict]] = {"aep": {}, "lockstep": {}}
    points = []
    cfgs = {s: sim_config_for(dp, spec, workload, len(requests[rates[0]]), tables[s], cores, arrival="poisson")
            for s in ("aep", "lockstep")}
    for rate in rates:
        wl = _workload(requests[rate], True)
        for system in ("aep", "lockstep"):
            cfg = cfgs[system]
            sim = run_one(cfg, system, cfg.cluster.gpus[0], policy=cfg.run.policies[0],
                          max_running=cfg.run.max_running_requests, workload=wl, replicas=cfg.run.replicas[0])
            predicted[system][rate] = {"itl_ms_p50": sim["itl_ms_p50"], "ttft_ms_p99": sim["ttft_ms_p99"],
                                       "output_tokens_per_s": float(sim["tokens_per_s"]), "failed_requests": 0}
            m = measured[system][rate]
            points.append({"system": system, "request_rate": rate,
                           "measured": {k: m.get(k) for k in ("output_tokens_per_s", "itl_ms_p50", "ttft_ms_p99")},
                           "predicted": {k: predicted[system][rate][k]
                                         for k in ("output_tokens_per_s", "itl_ms_p50", "ttft_ms_p99")},
                           "measured_meets_slo": meets_slo(m, itl_ms, ttft_ms),
                           "predicted_meets_slo": meets_slo(predicted[system][rate], itl_ms, ttft_ms)})
    g_meas = _goodput(workload, measured, itl_ms, ttft_ms)
    g_pred = _goodput(workload, predicted, itl_ms, ttft_ms)
    m_ratio = _ratio(g_meas["aep"]["tokens_per_s"], g_meas["lockstep"]["tokens_per_s"])
    p_ratio = _ratio(g_pred["aep"]["tokens_per_s"], g_pred["lockstep"]["tokens_per_s"])
    return {"kind": "goodput", "workload": workload, "slo": {"itl_p50_ms": itl_ms, "ttft_p99_ms": ttft_ms},
            "rates": rates, "points": points, "measured_goodput": g_meas, "predicted_goodput": g_pred,
            "measured_aep_vs_lockstep": m_ratio, "predicted_aep_vs_lockstep": p_ratio,
            # None where a system has no goodput on either side (no ratio to compare)
            "ratio_error": abs(p_ratio / m_ratio - 1.0) if m_ratio and p_ratio is not None else None,
            "verdicts_agree": sum(p["measured_meets_slo"] == p["predicted_meets_slo"] for p in points),
            "device_table": {s: t.name for s, t in tables.items()}}


def calibrate_tables(dp: AmoeConfig, model_path: str, output: Path) -> dict[str, Path]:
    """{system: calibrated table}: each system's attention linear timed at the threads its ranks
    resolve (AEP with two waves keeps one; lockstep's one wave lends the experts' cores), one
    table per distinct count: output/local-calibrated.yaml, then -t<threads>.yaml for another."""
    threads = {"aep": attention_threads(dp, attention_waves(dp)), "lockstep": attention_threads(dp, 1)}
    tables: dict[int, Path] = {}
    for n in dict.fromkeys(threads.values()):
        path = output / ("local-calibrated.yaml" if not tables else f"local-calibrated-t{n}.yaml")
        print(f"[bench] sim check: calibrating the local table (the ranks' code; attention linear at {n} "
              "thread(s))", file=sys.stderr, flush=True)
        calibrate(path, model_path, attention_threads=n)
        tables[n] = path
    return {s: tables[n] for s, n in threads.items()}


def sim_check(records: list[dict], dp: AmoeConfig, spec, model_path: str, output: Path,
              offline_requests: dict[str, list], poisson_requests: dict[str, dict[float, list]] | None = None,
              slo: tuple[float, float] | None = None) -> list[dict]:
    """Predicted vs measured AEP/lockstep at every offline point that ran both, on the same
    requests (prompt and output lengths), and, given the Poisson points' requests and the SLO,
    goodput at the SLO per workload; writes output/sim_check.json and the calibrated table
    output/local-calibrated.yaml."""
    points = [(r["workload"], r["num_requests"]) for r in records
              if r["system"] == "aep" and r["request_rate"] == 0 and r["workload"] in offline_requests]
    poisson_requests = poisson_requests or {}
    has_poisson = slo is not None and any(r["system"] == "aep" and r["request_rate"] > 0
                                          and r["workload"] in poisson_requests for r in records)
    if not (points or has_poisson) or dp.routing.mode != "exponential":  # the simulator draws the paper's skew only
        return []
    tables = calibrate_tables(dp, model_path, output)
    cores = min(len(os.sched_getaffinity(0)), dp.deployment.attention_ranks + dp.deployment.expert_ranks)
    checks = []
    for workload, n in points:
        measured = {r["system"]: r["output_tokens_per_s"] for r in records
                    if r["workload"] == workload and r["request_rate"] == 0 and r["system"] in ("aep", "lockstep")}
        if len(measured) < 2:
            continue
        wl = _workload(offline_requests[workload], False)
        try:
            cfgs = {s: sim_config_for(dp, spec, workload, n, tables[s], cores) for s in ("aep", "lockstep")}
            predicted = {s: float(run_one(c, s, c.cluster.gpus[0], policy=c.run.policies[0],
                                          max_running=c.run.max_running_requests, workload=wl,
                                          replicas=c.run.replicas[0])["tokens_per_s"])
                         for s, c in cfgs.items()}
        except (ConfigError, ValueError) as e:  # a deployment the simulator cannot model
            print(f"[bench] sim check {workload}: not simulated: {e}", file=sys.stderr, flush=True)
            checks.append({"kind": "saturation", "workload": workload, "num_requests": n, "error": str(e)})
            continue
        m_ratio = measured["aep"] / measured["lockstep"]
        p_ratio = predicted["aep"] / predicted["lockstep"]
        checks.append({"kind": "saturation", "workload": workload, "num_requests": n,
                       "measured_tokens_per_s": measured,
                       "predicted_tokens_per_s": predicted, "measured_aep_vs_lockstep": m_ratio,
                       "predicted_aep_vs_lockstep": p_ratio, "ratio_error": abs(p_ratio / m_ratio - 1.0),
                       "device_table": {s: t.name for s, t in tables.items()}})
        print(f"[bench] sim check {workload}: AEP/lockstep predicted {p_ratio:.2f}x, measured {m_ratio:.2f}x "
              f"({abs(p_ratio / m_ratio - 1.0):.0%} off)", file=sys.stderr, flush=True)
    for workload, by_rate in poisson_requests.items() if slo is not None else ():
        try:
            c = goodput_check(records, dp, spec, tables, cores, workload, by_rate, slo)
        except (ConfigError, ValueError) as e:
            print(f"[bench] sim check {workload} goodput: not simulated: {e}", file=sys.stderr, flush=True)
            checks.append({"kind": "goodput", "workload": workload, "error": str(e)})
            continue
        if not c:
            continue
        checks.append(c)
        g = lambda side, s: c[side][s]["tokens_per_s"]  # noqa: E731
        off = "no ratio" if c["ratio_error"] is None else f"{c['ratio_error']:.0%} off"
        print(f"[bench] sim check {workload} goodput at ITL p50 <= {slo[0]:g} ms, TTFT p99 <= {slo[1]:g} ms: "
              f"measured AEP {g('measured_goodput', 'aep'):.1f} / lockstep {g('measured_goodput', 'lockstep'):.1f}, "
              f"predicted {g('predicted_goodput', 'aep'):.1f} / {g('predicted_goodput', 'lockstep'):.1f} ({off}); "
              f"SLO verdicts agree at {c['verdicts_agree']}/{len(c['points'])} points", file=sys.stderr, flush=True)
    (output / "sim_check.json").write_text(json.dumps(checks, indent=1))
    return checks
