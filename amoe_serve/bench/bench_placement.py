"""The bench's expert placement for AEP and lockstep alike, planned the way a serving team plans
one (EPLB, Huang et al.): record a routing trace of the same deployment on held-out requests
(the served requests' seed + 1), plan the policy on all of it, serve every point with the file.

Both systems get the same file: a balanced placement is each one's best setting under skew
(vLLM's CPU backend runs every expert in one process and has nothing to balance).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from amoe_serve.bench.trace_record import record_trace
from amoe_serve.config import AmoeConfig
from amoe_serve.placement.layout import Placement
from amoe_serve.placement.policies import plan
from amoe_serve.placement.trace import Trace


def plan_bench_placement(policy: str, dp: AmoeConfig, output: Path, workload: str, num_requests: int,
                         seed: int, replica_slots: int = 0) -> Optional[Path]:
    """output/placement-<policy>.json planned on a trace of `dp` (output/placement-trace.json);
    None where there is nothing to plan (contiguous, or a single expert rank)."""
    ranks = dp.deployment.expert_ranks
    if policy == "contiguous" or ranks < 2:
        return None
    trace_path = output / "placement-trace.json"
    print(f"[bench] placement {policy}: recording a routing trace of {num_requests} held-out {workload} "
          "requests", file=sys.stderr, flush=True)
    record_trace(dp, trace_path, None, workload, num_requests, seed)
    place, info = plan(policy, Trace.load(trace_path), ranks, replica_slots=replica_slots or None)
    path = output / f"placement-{policy}.json"
    path.write_text(place.to_json(policy=policy, meta={"plan": info, "trace": trace_path.name}))
    return path


def sim_placement(dp: AmoeConfig, num_blocks: int, num_experts: int) -> tuple[str, int]:
    """(run.placement, replicas per rank per block) with which the simulator models the
    deployment's placement file: contiguous when there is none; otherwise the simulator's own
    balancing on the router's expected load (`replicate`, 0 copies = greedy), with a budget of
    the file's copies per rank per block, rounded up (its policy, like the data plane's, adds
    only the copies that lower a block's maximum rank load)."""
    if not dp.deployment.placement:
        return "contiguous", 0
    ranks = dp.deployment.expert_ranks
    place = Placement.from_file(dp.deployment.placement, num_blocks, num_experts, ranks)
    return "replicate", -(-place.num_replicas // (ranks * num_blocks))
