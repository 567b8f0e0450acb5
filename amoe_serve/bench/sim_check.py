"""Check the simulator against the bench: calibrate the local table in the same run (same
machine, same noise), simulate the bench's own deployment and workload, and compare the
predicted AEP/lockstep throughput ratio at saturation with the measured one."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from amoe_serve.config import AmoeConfig, ConfigError
from amoe_serve.engine.job import attention_waves
from amoe_serve.sim.calibrate import calibrate
from amoe_serve.sim.sim_config import load_sim_config
from amoe_serve.sim.engine import Workload
from amoe_serve.sim.run import run_one


def sim_config_for(dp: AmoeConfig, spec, workload: str, num_requests: int, table_path: Path, cores: int):
    """The simulator's view of one bench point (offline): same shape, ranks, limits, skew."""
    d, s, r = dp.deployment, dp.scheduler, dp.routing
    A, X = d.attention_ranks, d.expert_ranks
    over = [f"model.hidden={spec.hidden_size}", f"model.ffn={spec.expert_intermediate_size}",
            f"model.num_blocks={spec.num_blocks}", f"model.num_experts={spec.num_experts}",
            f"model.top_k={r.top_k or spec.top_k}", f"model.num_heads={spec.num_heads}",
            f"model.num_kv_heads={spec.num_kv_heads}", f"model.head_dim={spec.head_dim}",
            f"model.vocab={spec.vocab_size}", f"model.dtype_bytes={2 if dp.model.dtype in ('bfloat16', 'float16') else 4}",
            f"cluster.gpus=[{A + X}]", f"cluster.attention_fraction={A / (A + X)}",
            f"cluster.device={table_path}", f"cluster.cores={cores}",
            f"workload.name={workload}", "workload.arrival=offline", f"workload.num_requests={num_requests}",
            "workload.duration_s=0", "workload.warmup_s=0", "workload.warm_start=false",
            f"workload.skew_rate={r.rate}",
            "run.systems=[aep,lockstep]", f"run.policies=[{s.policy}]", f"run.lookahead={s.lookahead}",
            f"run.decay={s.decay}", f"run.max_running_requests={dp.engine.max_running_requests}",
            f"run.lockstep_max_running=[{dp.engine.max_running_requests}]",
            f"run.max_batch_tokens={dp.engine.max_batch_tokens}", f"run.max_expert_batch={s.max_expert_batch}",
            f"run.group_block={str(s.group_block).lower()}", f"run.attention_waves={attention_waves(dp)}",
            f"run.attention_max_wait_ms={s.attention_max_wait_ms}", "run.lockstep_layout=split"]
    return load_sim_config(None, over)


def sim_check(records: list[dict], dp: AmoeConfig, spec, model_path: str, output: Path,
              offline_requests: dict[str, list]) -> list[dict]:
    """Predicted vs measured AEP/lockstep at every offline point that ran both, on the same
    requests (prompt and output lengths); writes output/sim_check.json and the calibrated
    table output/local-calibrated.yaml."""
    import numpy as np

    points = [(r["workload"], r["num_requests"]) for r in records
              if r["system"] == "aep" and r["request_rate"] == 0 and r["workload"] in offline_requests]
    if not points or dp.routing.mode != "exponential":  # the simulator draws the paper's skew only
        return []
    table_path = output / "local-calibrated.yaml"
    print("[bench] sim check: calibrating the local table (the ranks' code, one thread)", file=sys.stderr, flush=True)
    calibrate(table_path, model_path)
    cores = min(len(os.sched_getaffinity(0)), dp.deployment.attention_ranks + dp.deployment.expert_ranks)
    checks = []
    for workload, n in points:
        measured = {r["system"]: r["output_tokens_per_s"] for r in records
                    if r["workload"] == workload and r["request_rate"] == 0 and r["system"] in ("aep", "lockstep")}
        if len(measured) < 2:
            continue
        reqs = offline_requests[workload]
        wl = Workload(np.zeros(len(reqs)), np.array([len(q.prompt_token_ids) for q in reqs]),
                      np.array([q.max_tokens for q in reqs]))
        try:
            cfg = sim_config_for(dp, spec, workload, n, table_path, cores)
            predicted = {system: float(run_one(cfg, system, cfg.cluster.gpus[0], policy=cfg.run.policies[0],
                                               max_running=cfg.run.max_running_requests, workload=wl)["tokens_per_s"])
                         for system in ("aep", "lockstep")}
        except (ConfigError, ValueError) as e:  # a deployment the simulator cannot model
            print(f"[bench] sim check {workload}: not simulated: {e}", file=sys.stderr, flush=True)
            checks.append({"workload": workload, "num_requests": n, "error": str(e)})
            continue
        m_ratio = measured["aep"] / measured["lockstep"]
        p_ratio = predicted["aep"] / predicted["lockstep"]
        checks.append({"workload": workload, "num_requests": n, "measured_tokens_per_s": measured,
                       "predicted_tokens_per_s": predicted, "measured_aep_vs_lockstep": m_ratio,
                       "predicted_aep_vs_lockstep": p_ratio, "ratio_error": abs(p_ratio / m_ratio - 1.0),
                       "device_table": table_path.name})
        print(f"[bench] sim check {workload}: AEP/lockstep predicted {p_ratio:.2f}x, measured {m_ratio:.2f}x "
              f"({abs(p_ratio / m_ratio - 1.0):.0%} off)", file=sys.stderr, flush=True)
    (output / "sim_check.json").write_text(json.dumps(checks, indent=1))
    return checks
