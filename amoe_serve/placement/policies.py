"""Placement policies: pure functions Trace (+ params) -> Placement.

- `contiguous`: today's default, experts split into contiguous ranges (Placement.contiguous).
- `greedy` (Huang et al., "Towards MoE Deployment"): per block, experts by historical load,
  heaviest first, each to the least-loaded rank that still has room (ceil(E/R) experts per rank,
  so the most experts a rank holds is the same as with contiguous).
- `ilp` (MoETuner's two stages, solved with HiGHS through scipy.optimize.milp):
  stage 1, per block: split the experts into R groups (same capacity, >= 1 expert per group)
  minimising the largest group load; stage 2: give each block's groups to ranks minimising the
  cross-rank traffic between consecutive blocks, weighted by a rank-pair cost matrix. Stage 2 is
  a chain of quadratic assignments: a joint MILP linearised exactly (`_stage2_milp`), or exact
  dynamic programming for a non-uniform matrix on <= 6 ranks (`_stage2_dp`), or block by block
  when the joint MILP would be too big (said in the info dict). Guarantee: the result is never
  worse than greedy's on (sum over blocks of the max rank load, then traffic), compared in that
  order: stage 1 only searches below greedy's max (and keeps greedy's grouping otherwise), and
  stage 2 keeps the best of the solver's, the block-by-block and the unpermuted assignment (the
  last is greedy's own when every block kept greedy's grouping). Time limit: half for stage 1
  (spread over blocks), the rest for stage 2; at the limit the best found so far is kept (with a
  warning), and when the solver found nothing at all the policy returns greedy's placement.
- `replicate`: from greedy (or a given base), extra copies of the hottest experts on other
  ranks under a per-rank memory budget, each placed where it lowers the block's max rank load
  most, with the dispatch rule that a replicated expert's rows are split evenly over its ranks.

Everything here is deterministic (no randomness; ties broken by index).

Legend: B blocks, E experts per block, R expert ranks, G groups of stage 1 (G = R),
L = B-1 block boundaries, N replica slots per rank, V MILP variables.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from amoe_serve.placement.greedy import contiguous, greedy
from amoe_serve.placement.ilp import ilp, solve_ilp
from amoe_serve.placement.layout import Placement, PlacementError
from amoe_serve.placement.objective import capacity, check_ranks, cost_matrix, jsonable, objective, traffic
from amoe_serve.placement.replicate import replicate, solve_replicate
from amoe_serve.placement.trace import Trace

# The policies live one per module (greedy, ilp, replicate) beside what judges them (objective);
# this module names them and runs one by name.
__all__ = ["POLICIES", "plan", "contiguous", "greedy", "ilp", "solve_ilp", "replicate", "solve_replicate",
           "capacity", "check_ranks", "cost_matrix", "jsonable", "objective", "traffic"]

POLICIES = ("contiguous", "greedy", "ilp", "replicate")


# ---- one entry point for the CLI / evaluation -----------------------------------------------------------
def plan(policy: str, trace: Trace, ranks: int, time_limit: float = 60.0, replica_slots: Optional[int] = None,
         bandwidth: Any = None, progress: bool = False) -> tuple[Placement, dict]:
    """(placement, info) for a policy by name. replicate's default budget: one extra expert slot
    per block on every rank (num_blocks slots per rank)."""
    t0 = time.perf_counter()
    if policy == "contiguous":
        p, info = contiguous(trace, ranks), {"policy": "contiguous"}
    elif policy == "greedy":
        p, info = greedy(trace, ranks), {"policy": "greedy"}
    elif policy == "ilp":
        res = solve_ilp(trace, ranks, time_limit, bandwidth, progress)
        p, info = res.placement, res.info
    elif policy == "replicate":
        slots = trace.num_blocks if replica_slots is None else replica_slots
        p, info = solve_replicate(trace, ranks, slots)
    else:
        raise PlacementError(f"unknown placement policy {policy!r} (choose from {', '.join(POLICIES)})")
    info.setdefault("seconds", time.perf_counter() - t0)
    return p, jsonable(info)
