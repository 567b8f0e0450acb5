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

import contextlib
import ctypes
import heapq
import itertools
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, linear_sum_assignment, milp

from amoe_serve.placement.layout import Placement, PlacementError
from amoe_serve.placement.trace import Trace

log = logging.getLogger("amoe_serve.placement")

POLICIES = ("contiguous", "greedy", "ilp", "replicate")
# Above this many variables the joint stage-2 MILP is not attempted (block-by-block instead).
STAGE2_MAX_VARS = 60_000
# Up to this many ranks stage 2 with a non-uniform cost matrix is solved exactly by dynamic
# programming (R! states per block); the MILP's relaxation is weak there.
STAGE2_DP_MAX_RANKS = 6


# ---- shared helpers ---------------------------------------------------------------------------
def check_ranks(trace: Trace, ranks: int) -> None:
    if not isinstance(ranks, int) or ranks < 1:
        raise PlacementError(f"--ranks must be a positive integer, got {ranks!r}")
    if ranks > trace.num_experts:
        raise PlacementError(f"{ranks} expert ranks but the trace has only {trace.num_experts} experts "
                             "per block: some ranks would own nothing")


def capacity(num_experts: int, ranks: int) -> int:
    """Most experts of one block a rank may hold: ceil(E/R), as with the contiguous split."""
    return -(-num_experts // ranks)


def cost_matrix(ranks: int, bandwidth: Any = None) -> np.ndarray:
    """cost_RR[r, s]: cost of one transition from rank r (block b) to rank s (block b+1).
    Default 1 off the diagonal. The diagonal is ignored (same-rank transitions are free)."""
    if bandwidth is None:
        cost_RR = np.ones((ranks, ranks))
    else:
        try:
            cost_RR = np.array(bandwidth, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise PlacementError(f"bandwidth cost matrix is not numeric: {e}") from None
        if cost_RR.shape != (ranks, ranks):
            raise PlacementError(f"bandwidth cost matrix has shape {cost_RR.shape}, expected "
                                 f"{(ranks, ranks)} (one row and column per expert rank)")
        if not np.isfinite(cost_RR).all() or (cost_RR < 0).any():
            raise PlacementError("bandwidth cost matrix must be finite and non-negative")
    np.fill_diagonal(cost_RR, 0.0)
    return cost_RR


def rank_loads_BR(load_BE: np.ndarray, rank_BE: np.ndarray, ranks: int) -> np.ndarray:
    """Rows per rank per block for a placement without replicas."""
    B = load_BE.shape[0]
    out_BR = np.zeros((B, ranks))
    for b in range(B):
        np.add.at(out_BR[b], rank_BE[b], load_BE[b])
    return out_BR


def traffic(trans_LEE: np.ndarray, rank_BE: np.ndarray, cost_RR: np.ndarray) -> float:
    """Weighted cross-rank transitions of a placement without replicas."""
    total = 0.0
    for l in range(trans_LEE.shape[0]):
        total += float((trans_LEE[l] * cost_RR[rank_BE[l][:, None], rank_BE[l + 1][None, :]]).sum())
    return total


def objective(trace: Trace, rank_BE: np.ndarray, ranks: int, cost_RR: np.ndarray) -> tuple[float, float]:
    """The ILP's objective, compared in this order: (sum over blocks of the max rank load, traffic)."""
    return (float(rank_loads_BR(trace.load_BE, rank_BE, ranks).max(axis=1).sum()),
            traffic(trace.trans_LEE, rank_BE, cost_RR))


# ---- contiguous, greedy -------------------------------------------------------------------------
def contiguous(trace: Trace, ranks: int) -> Placement:
    check_ranks(trace, ranks)
    return Placement.contiguous(trace.num_blocks, trace.num_experts, ranks)


def greedy_block(load_E: np.ndarray, ranks: int, cap: int) -> np.ndarray:
    """One block of Huang et al.'s greedy: heaviest expert first to the least-loaded rank with room.
    Ties: fewer experts, then lower rank; so while a rank is empty it takes the next expert, and
    every rank gets at least one (E >= R)."""
    rank_E = np.zeros(load_E.shape[0], dtype=np.int64)
    load_R = np.zeros(ranks)
    count_R = np.zeros(ranks, dtype=np.int64)
    for e in np.argsort(-load_E, kind="stable"):
        room = np.flatnonzero(count_R < cap)
        r = int(room[np.lexsort((room, count_R[room], load_R[room]))[0]])
        rank_E[e] = r
        load_R[r] += load_E[e]
        count_R[r] += 1
    return rank_E


def greedy_ranks_BE(load_BE: np.ndarray, ranks: int) -> np.ndarray:
    cap = capacity(load_BE.shape[1], ranks)
    return np.stack([greedy_block(load_BE[b], ranks, cap) for b in range(load_BE.shape[0])])


def greedy(trace: Trace, ranks: int) -> Placement:
    check_ranks(trace, ranks)
    return Placement.from_arrays(greedy_ranks_BE(trace.load_BE, ranks), ranks)


# ---- the MILP call (one place, so tests can make it fail) ---------------------------------------
@dataclass
class MilpOutcome:
    x: Optional[np.ndarray]       # None: no feasible solution
    status: str                   # "optimal" | "time-limit" | "no-solution" | "infeasible" | "error: ..."
    gap: Optional[float] = None   # relative MIP gap when stopped early
    seconds: float = 0.0


@contextlib.contextmanager
def _stdout_to_stderr(active: bool):
    """Points file descriptor 1 at stderr for the duration (the solver prints from C)."""
    if not active:
        yield
        return
    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def _milp(c: np.ndarray, integrality: np.ndarray, bounds: Bounds, constraints: list[LinearConstraint],
          time_limit: float, disp: bool) -> MilpOutcome:
    t0 = time.perf_counter()
    # mip_rel_gap 0: "optimal" means proven optimal; the time limit bounds the work instead.
    with _stdout_to_stderr(disp):   # HiGHS' progress log: keep stdout for the command's result
        res = milp(c, integrality=integrality, bounds=bounds, constraints=constraints,
                   options={"time_limit": max(float(time_limit), 1e-3), "disp": bool(disp), "mip_rel_gap": 0.0})
    secs = time.perf_counter() - t0
    x = None if res.x is None else np.asarray(res.x)
    gap = getattr(res, "mip_gap", None)
    if res.status == 0 and x is not None:
        return MilpOutcome(x, "optimal", 0.0, secs)
    if res.status == 1:
        return MilpOutcome(x, "time-limit" if x is not None else "no-solution", gap, secs)
    if res.status == 2:
        return MilpOutcome(None, "infeasible", None, secs)
    return MilpOutcome(None, f"error: {res.message}", None, secs)


# ---- ILP stage 1: balanced groups per block ---------------------------------------------------------
def _stage1_block(load_E: np.ndarray, groups: int, cap: int, below: float, time_limit: float,
                  disp: bool) -> tuple[Optional[np.ndarray], MilpOutcome]:
    """min t  s.t. every expert in exactly one group, 1 <= |group| <= cap, load(group) <= t <= below - 1.
    Loads are integers, so t is too; `below` is greedy's max: the solver only looks for strict
    improvements (scipy's HiGHS takes no starting solution, this cut plays that part), and
    "infeasible" proves greedy's grouping optimal. x[e, g] is variable e*G + g, t the last one.
    Returns (group of each expert, or None, and the outcome)."""
    E, G = load_E.shape[0], groups
    V = E * G + 1
    c = np.zeros(V)
    c[-1] = 1.0
    lb, ub = np.zeros(V), np.ones(V)
    # Groups are interchangeable: the k-th heaviest expert may only use groups 0..k (any
    # partition can be relabelled so); removes the G! copies of each solution.
    for k, e in enumerate(np.argsort(-load_E, kind="stable")):
        ub[e * G + k + 1:(e + 1) * G] = 0.0
    lb[-1] = max(float(load_E.max(initial=0)), math.ceil(float(load_E.sum()) / G))
    ub[-1] = float(below) - 1.0
    if ub[-1] < lb[-1]:
        return None, MilpOutcome(None, "infeasible")
    eg = np.arange(E * G)
    one_group = sp.csr_matrix((np.ones(E * G), (eg // G, eg)), shape=(E, V))
    sizes = sp.csr_matrix((np.ones(E * G), (eg % G, eg)), shape=(G, V))
    # load(group g) - t <= 0: row g has load_E[e] at column e*G + g, and -1 at t.
    A_load = sp.csr_matrix((np.concatenate([np.tile(load_E.astype(np.float64), G), -np.ones(G)]),
                            (np.concatenate([np.repeat(np.arange(G), E), np.arange(G)]),
                             np.concatenate([(np.arange(E)[None, :] * G + np.arange(G)[:, None]).reshape(-1),
                                             np.full(G, V - 1)]))), shape=(G, V))
    cons = [LinearConstraint(one_group, 1, 1), LinearConstraint(sizes, 1, cap),
            LinearConstraint(A_load, -np.inf, 0)]
    out = _milp(c, np.ones(V), Bounds(lb, ub), cons, time_limit, disp)
    if out.x is None:
        return None, out
    group_E = out.x[:E * G].reshape(E, G).argmax(axis=1)
    return group_E.astype(np.int64), out


# ---- ILP stage 2: groups -> ranks across consecutive blocks -----------------------------------------
def _group_traffic_LGG(trans_LEE: np.ndarray, group_BE: np.ndarray, groups: int) -> np.ndarray:
    """T_LGG[l, g, h]: transitions from group g at block l to group h at block l+1."""
    L = trans_LEE.shape[0]
    out = np.zeros((L, groups, groups))
    for l in range(L):
        onehot_a = np.eye(groups)[group_BE[l]]
        onehot_b = np.eye(groups)[group_BE[l + 1]]
        out[l] = onehot_a.T @ trans_LEE[l] @ onehot_b
    return out


def _perm_traffic(T_LGG: np.ndarray, perm_BG: np.ndarray, cost_RR: np.ndarray) -> float:
    return float(sum((T_LGG[l] * cost_RR[perm_BG[l][:, None], perm_BG[l + 1][None, :]]).sum()
                     for l in range(T_LGG.shape[0])))


def _stage2_sweeps(T_LGG: np.ndarray, perm_BG: np.ndarray, cost_RR: np.ndarray, forward: bool,
                   max_sweeps: int = 50) -> np.ndarray:
    """Block-by-block: with its neighbours fixed, one block's assignment is a linear assignment
    problem, solved exactly; optionally a first forward pass (block b given b-1), then sweeps until
    no block improves. Monotone, so it ends."""
    B, G = perm_BG.shape
    perm_BG = perm_BG.copy()

    def block_cost(b: int, use_next: bool) -> np.ndarray:
        cost_GR = np.zeros((G, G))
        if b > 0:      # from block b-1: sum_h T[b-1, h, g] * cost[perm[b-1, h], r]
            cost_GR += T_LGG[b - 1].T @ cost_RR[perm_BG[b - 1]]
        if use_next and b < B - 1:   # to block b+1: sum_h T[b, g, h] * cost[r, perm[b+1, h]]
            cost_GR += T_LGG[b] @ cost_RR[:, perm_BG[b + 1]].T
        return cost_GR

    if forward:
        for b in range(1, B):
            _, perm_BG[b] = linear_sum_assignment(block_cost(b, use_next=False))
    best = _perm_traffic(T_LGG, perm_BG, cost_RR)
    for _ in range(max_sweeps):
        improved = False
        for b in range(B):
            old = perm_BG[b].copy()
            _, perm_BG[b] = linear_sum_assignment(block_cost(b, use_next=True))
            now = _perm_traffic(T_LGG, perm_BG, cost_RR)
            if now < best - 1e-9:
                best, improved = now, True
            else:
                perm_BG[b] = old
        if not improved:
            break
    return perm_BG


def _stage2_dp(T_LGG: np.ndarray, cost_RR: np.ndarray) -> np.ndarray:
    """Exact stage 2 by dynamic programming over the chain of blocks: a state is one block's
    permutation (R! of them), so this is for small R (any cost matrix). O(L * R!^2 * R)."""
    L, G, _ = T_LGG.shape
    perms_PG = np.array(list(itertools.permutations(range(G))), dtype=np.int64)
    P = perms_PG.shape[0]
    best_P = np.zeros(P)
    back_LP = np.zeros((L, P), dtype=np.int64)
    for l in range(L):
        # U[p, h, s] = sum_g T[g, h] * cost[perm_p(g), s]; step[p, q] = sum_h U[p, h, perm_q(h)]
        U_PGR = np.einsum("gh,pgs->phs", T_LGG[l], cost_RR[perms_PG])
        step_PP = sum(U_PGR[:, h, :][:, perms_PG[:, h]] for h in range(G))
        tot_PP = best_P[:, None] + step_PP
        back_LP[l] = tot_PP.argmin(axis=0)
        best_P = tot_PP[back_LP[l], np.arange(P)]
    idx = [int(best_P.argmin())]
    for l in range(L - 1, -1, -1):
        idx.append(int(back_LP[l][idx[-1]]))
    return perms_PG[idx[::-1]]


def _stage2_size(T_LGG: np.ndarray, B: int, G: int, uniform: bool) -> int:
    nnz = int((T_LGG > 0).sum())
    return B * G * G + nnz * (G if uniform else G * G)


def _stage2_milp(T_LGG: np.ndarray, cost_RR: np.ndarray, uniform: bool, time_limit: float,
                 disp: bool) -> tuple[Optional[np.ndarray], MilpOutcome]:
    """Joint assignment of every block's groups to ranks. y[b, g, r] = 1 when group g of block b
    goes to rank r (a permutation per block). The quadratic traffic term y[l, g, r] * y[l+1, h, s]
    is linearised exactly:
    - uniform cost c off the diagonal: traffic = c * (all - same-rank), so maximise the same-rank
      part with w[l, g, h, r] <= y; per (l, g, r): sum_h w <= y[l, g, r], per (l, h, r):
      sum_g w <= y[l+1, h, r] (a group meets at most one group of the next block on its rank);
      rank labels are symmetric, so block 0 is fixed to the identity;
    - general cost: z[l, g, r, h, s] in [0, 1] with sum_s z = y[l, g, r] (per l, g, r, h) and
      sum_r z = y[l+1, h, s] (per l, g, h, s), which force z = y * y' when y is binary.
    Only (l, g, h) pairs with traffic get w / z variables."""
    L, G, _ = T_LGG.shape
    B = L + 1
    nY = B * G * G
    yi = lambda b, g, r: (b * G + g) * G + r  # noqa: E731
    pairs = [(l, g, h) for l in range(L) for g in range(G) for h in range(G) if T_LGG[l, g, h] > 0]
    rows_i: list[int] = []
    cols_i: list[int] = []
    vals: list[float] = []
    row_lb: list[float] = []
    row_ub: list[float] = []

    def add_row(cols: list[int], coefs: list[float], lo: float, hi: float) -> None:
        r = len(row_lb)
        rows_i.extend([r] * len(cols))
        cols_i.extend(cols)
        vals.extend(coefs)
        row_lb.append(lo)
        row_ub.append(hi)

    for b in range(B):   # permutation per block
        for g in range(G):
            add_row([yi(b, g, r) for r in range(G)], [1.0] * G, 1, 1)
        for r in range(G):
            add_row([yi(b, g, r) for g in range(G)], [1.0] * G, 1, 1)
    if uniform:
        c_off = float(cost_RR[0, 1]) if G > 1 else 0.0
        V = nY + len(pairs) * G
        c = np.zeros(V)
        wi = {}
        for k, (l, g, h) in enumerate(pairs):
            for r in range(G):
                wi[l, g, h, r] = nY + k * G + r
                c[nY + k * G + r] = -c_off * T_LGG[l, g, h]
        by_lgr: dict[tuple, list[int]] = {}
        by_lhr: dict[tuple, list[int]] = {}
        for (l, g, h, r), v in wi.items():
            by_lgr.setdefault((l, g, r), []).append(v)
            by_lhr.setdefault((l, h, r), []).append(v)
        for (l, g, r), vs in by_lgr.items():
            add_row(vs + [yi(l, g, r)], [1.0] * len(vs) + [-1.0], -np.inf, 0)
        for (l, h, r), vs in by_lhr.items():
            add_row(vs + [yi(l + 1, h, r)], [1.0] * len(vs) + [-1.0], -np.inf, 0)
    else:
        V = nY + len(pairs) * G * G
        c = np.zeros(V)
        for k, (l, g, h) in enumerate(pairs):
            base = nY + k * G * G               # z index: base + r * G + s
            c[base:base + G * G] = T_LGG[l, g, h] * cost_RR.reshape(-1)
            for r in range(G):
                add_row([base + r * G + s for s in range(G)] + [yi(l, g, r)], [1.0] * G + [-1.0], 0, 0)
            for s in range(G):
                add_row([base + r * G + s for r in range(G)] + [yi(l + 1, h, s)], [1.0] * G + [-1.0], 0, 0)
    lb, ub = np.zeros(V), np.ones(V)
    integrality = np.zeros(V)
    integrality[:nY] = 1
    if uniform:
        for g in range(G):
            lb[yi(0, g, g)] = 1.0
    A = sp.csr_matrix((vals, (rows_i, cols_i)), shape=(len(row_lb), V))
    out = _milp(c, integrality, Bounds(lb, ub), [LinearConstraint(A, row_lb, row_ub)], time_limit, disp)
    if out.x is None:
        return None, out
    perm_BG = out.x[:nY].reshape(B, G, G).argmax(axis=2)
    return perm_BG.astype(np.int64), out


# ---- ILP: both stages -----------------------------------------------------------------------------
@dataclass
class IlpResult:
    placement: Placement
    info: dict = field(default_factory=dict)


def solve_ilp(trace: Trace, ranks: int, time_limit: float = 60.0, bandwidth: Any = None,
              progress: bool = False) -> IlpResult:
    check_ranks(trace, ranks)
    t_start = time.perf_counter()
    deadline = t_start + float(time_limit)
    B, E, R = trace.num_blocks, trace.num_experts, ranks
    cap = capacity(E, R)
    cost_RR = cost_matrix(R, bandwidth)
    load_BE, trans_LEE = trace.load_BE, trace.trans_LEE
    greedy_BE = greedy_ranks_BE(load_BE, R)
    greedy_obj = objective(trace, greedy_BE, R, cost_RR)
    greedy_max_B = rank_loads_BR(load_BE, greedy_BE, R).max(axis=1)

    def say(msg: str) -> None:
        if progress:
            print(f"[ilp] {msg}", file=sys.stderr, flush=True)

    def fall_back(reason: str) -> IlpResult:
        log.warning("ilp: %s; falling back to the greedy placement", reason)
        info = {"policy": "ilp", "fallback": f"greedy ({reason})", "objective": _obj_dict(greedy_obj),
                "greedy_objective": _obj_dict(greedy_obj), "seconds": time.perf_counter() - t_start}
        return IlpResult(Placement.from_arrays(greedy_BE, R), info)

    # Stage 1. Group labels: greedy's ranks where greedy's grouping is kept (so "identity" in
    # stage 2 reproduces greedy there), else the solver's group numbers.
    stage1_budget = float(time_limit) * (0.5 if B > 1 else 1.0)
    group_BE = np.zeros((B, E), dtype=np.int64)
    status_B: list[str] = []
    max_B = np.zeros(B)
    not_proven: list[int] = []
    solver_calls = solver_answers = 0
    solver_failed = False      # a solve ended without any solution (time limit / error)
    for b in range(B):
        lower = max(float(load_BE[b].max(initial=0)), math.ceil(float(load_BE[b].sum()) / R))
        group_BE[b], max_B[b] = greedy_BE[b], greedy_max_B[b]
        if greedy_max_B[b] <= lower:
            # Greedy already meets the lower bound: proven optimal, nothing to solve.
            status_B.append("optimal (greedy meets the lower bound)")
            say(f"stage 1 block {b + 1}/{B}: greedy's max rank load {max_B[b]:.0f} meets the lower bound")
            continue
        left = stage1_budget - (time.perf_counter() - t_start)
        limit = max(left / (B - b), 0.01)
        group_E, out = _stage1_block(load_BE[b], R, cap, greedy_max_B[b], limit, disp=False)
        solver_calls += 1
        if out.status == "infeasible":     # nothing beats greedy: greedy's grouping is optimal
            status_B.append("optimal (greedy proven)")
            solver_answers += 1
        elif group_E is not None:
            group_BE[b] = group_E
            max_B[b] = float(np.bincount(group_E, weights=load_BE[b], minlength=R).max())
            status_B.append(out.status)
            solver_answers += 1
        else:
            status_B.append(f"{out.status} (greedy kept)")
            solver_failed = True
        if not status_B[-1].startswith("optimal"):
            not_proven.append(b)
        say(f"stage 1 block {b + 1}/{B}: max rank load {max_B[b]:.0f} (greedy {greedy_max_B[b]:.0f}) "
            f"{status_B[-1]} in {out.seconds:.2f} s")
    if not_proven:
        log.warning("ilp: stage 1 was not proven optimal in %d of %d blocks (%s: time limit %.3g s); "
                    "those keep the best grouping found, greedy's if none was better (raise --time-limit)",
                    len(not_proven), B, ", ".join(map(str, not_proven[:10])) + (" ..." if len(not_proven) > 10 else ""),
                    float(time_limit))

    # Stage 2.
    T_LGG = _group_traffic_LGG(trans_LEE, group_BE, R)
    off = cost_RR[~np.eye(R, dtype=bool)]
    uniform = off.size == 0 or bool(np.all(off == off[0]))
    identity_BG = np.tile(np.arange(R), (B, 1))
    candidates: dict[str, np.ndarray] = {"identity": identity_BG}
    candidates["block-by-block"] = min(
        (_stage2_sweeps(T_LGG, identity_BG, cost_RR, forward=f) for f in (True, False)),
        key=lambda p: _perm_traffic(T_LGG, p, cost_RR))
    stage2: dict[str, Any] = {"uniform_cost": uniform}
    size = _stage2_size(T_LGG, B, R, uniform)
    if B == 1 or R == 1 or T_LGG.sum() == 0 or (uniform and off.size and off[0] == 0):
        stage2.update(method="trivial", status="optimal")
    elif not uniform and R <= STAGE2_DP_MAX_RANKS:
        t0 = time.perf_counter()
        candidates = {"exact-dp": _stage2_dp(T_LGG, cost_RR), **candidates}
        stage2.update(method="exact-dp", status="optimal", seconds=time.perf_counter() - t0)
        solver_answers += 1
        say(f"stage 2: exact dynamic programming over {math.factorial(R)} assignments per block")
    elif size > STAGE2_MAX_VARS:
        stage2.update(method="block-by-block", status="heuristic",
                      note=f"joint MILP would have {size} variables (> {STAGE2_MAX_VARS}); "
                           "assigned block by block (exact per block given its neighbours)")
        say(stage2["note"])
    else:
        limit = max(deadline - time.perf_counter(), 0.05)
        say(f"stage 2: joint MILP, {size} variables, time limit {limit:.1f} s")
        perm_BG, out = _stage2_milp(T_LGG, cost_RR, uniform, limit, disp=progress)
        stage2.update(method="joint-milp", status=out.status, variables=size, seconds=out.seconds,
                      gap=out.gap)
        if perm_BG is None and solver_answers == 0:
            return fall_back(f"the solver found no solution within the time limit (stage 2: {out.status}"
                             + (f"; stage 1: no answer in {solver_calls} block(s)" if solver_calls else "")
                             + ")")
        if perm_BG is None:
            solver_failed = True
            log.warning("ilp: stage 2 joint MILP ended with %s; using the block-by-block assignment",
                        out.status)
        else:
            candidates = {"joint-milp": perm_BG, **candidates}
            if out.status != "optimal":
                log.warning("ilp: stage 2 stopped at the time limit (gap %s); keeping the best "
                            "assignment found", out.gap)
    if solver_failed and solver_answers == 0 and "joint-milp" not in candidates:
        return fall_back(f"the solver found no solution within the time limit (stage 1: no answer in "
                         f"{solver_calls} block(s))")
    traffic_by = {k: _perm_traffic(T_LGG, p, cost_RR) for k, p in candidates.items()}
    source = min(traffic_by, key=lambda k: (traffic_by[k], list(candidates).index(k)))
    perm_BG = candidates[source]
    stage2.update(source=source, traffic_by_source=traffic_by)
    rank_BE = np.take_along_axis(perm_BG, group_BE, axis=1)

    obj = objective(trace, rank_BE, R, cost_RR)
    info: dict[str, Any] = {
        "policy": "ilp", "fallback": None,
        "stage1": {"status_B": status_B, "max_load_B": max_B.tolist(),
                   "greedy_max_load_B": greedy_max_B.tolist(),
                   "blocks_kept_greedy_grouping": int((group_BE == greedy_BE).all(axis=1).sum()),
                   "blocks_proven_optimal": sum(x.startswith("optimal") for x in status_B)},
        "stage2": stage2, "objective": _obj_dict(obj), "greedy_objective": _obj_dict(greedy_obj),
    }
    # Safety net (cannot trigger if the reasoning above holds): never hand back worse than greedy.
    if _lex_worse(obj, greedy_obj):
        log.warning("ilp: result %s is worse than greedy's %s; keeping greedy", obj, greedy_obj)
        info.update(fallback="greedy (better objective)", objective=_obj_dict(greedy_obj))
        rank_BE = greedy_BE
    info["seconds"] = time.perf_counter() - t_start
    say(f"done: max-load sum {info['objective']['max_load_sum']:.0f} (greedy {greedy_obj[0]:.0f}), "
        f"traffic {info['objective']['traffic']:.0f} (greedy {greedy_obj[1]:.0f}), stage 2 from {source}")
    return IlpResult(Placement.from_arrays(rank_BE, R), info)


def _obj_dict(obj: tuple[float, float]) -> dict:
    return {"max_load_sum": obj[0], "traffic": obj[1]}


def _lex_worse(a: tuple[float, float], b: tuple[float, float], eps: float = 1e-6) -> bool:
    if a[0] > b[0] + eps * max(1.0, abs(b[0])):
        return True
    if abs(a[0] - b[0]) <= eps * max(1.0, abs(b[0])):
        return a[1] > b[1] + eps * max(1.0, abs(b[1]))
    return False


def ilp(trace: Trace, ranks: int, time_limit: float = 60.0, bandwidth: Any = None,
        progress: bool = False) -> Placement:
    return solve_ilp(trace, ranks, time_limit, bandwidth, progress).placement


# ---- replicate --------------------------------------------------------------------------------------
def replicate(trace: Trace, ranks: int, replica_slots: int, base: Optional[Placement] = None) -> Placement:
    return solve_replicate(trace, ranks, replica_slots, base)[0]


def solve_replicate(trace: Trace, ranks: int, replica_slots: int,
                    base: Optional[Placement] = None) -> tuple[Placement, dict]:
    """Adds copies one at a time: each step takes, over all blocks, the (expert on a max-loaded
    rank, target rank with a free slot) that lowers that block's max/mean rank load most (or, at
    equal max, leaves fewer ranks at the max, which is what lets the next copy lower it). Stops
    when no copy helps or no slot is left.

    Budget, `replica_slots` N (a memory budget, summed over all blocks): no rank holds more than
    N expert copies beyond contiguous's per-rank maximum, num_blocks * ceil(E/R); with a given
    base, at most N copies are added per rank. Without a given base, the repacked alternative
    (`_repack`, same bound) is also tried and kept when better; info["method"] says which."""
    check_ranks(trace, ranks)
    if not isinstance(replica_slots, int) or replica_slots < 0:
        raise PlacementError(f"--replica-slots must be a non-negative integer, got {replica_slots!r}")
    B, E, R = trace.num_blocks, trace.num_experts, ranks
    repack = base is None
    base = base if base is not None else greedy(trace, ranks)
    base.validate(B, E, "base placement")
    load_BE = trace.load_BE.astype(np.float64)
    ranks_BE: list[list[list[int]]] = [[list(base.ranks_of(b, e)) for e in range(E)] for b in range(B)]
    free_R = np.full(R, replica_slots, dtype=np.int64)
    load_BR = np.zeros((B, R))
    for b in range(B):
        for e in range(E):
            for r in ranks_BE[b][e]:
                load_BR[b, r] += load_BE[b, e] / len(ranks_BE[b][e])
    added = 0
    while free_R.any():
        best = None   # (key, b, e, r)
        for b in range(B):
            loads_R = load_BR[b]
            mean = loads_R.sum() / R
            if mean <= 0:
                continue
            top = loads_R.max()
            tol = 1e-9 * top
            at_max = int((loads_R >= top - tol).sum())
            hot = set(np.flatnonzero(loads_R >= top - tol).tolist())
            for e in range(E):
                held = ranks_BE[b][e]
                if load_BE[b, e] <= 0 or not hot.intersection(held):
                    continue
                m = len(held)
                cut = load_BE[b, e] / m - load_BE[b, e] / (m + 1)
                after_R = loads_R.copy()
                after_R[held] -= cut
                targets = [r for r in range(R) if free_R[r] > 0 and r not in held]
                for r in targets:
                    new_R = after_R.copy()
                    new_R[r] += load_BE[b, e] / (m + 1)
                    new_top = new_R.max()
                    d_max = (top - new_top) / mean
                    d_count = at_max - int((new_R >= new_top - tol).sum()) if new_top >= top - tol else 0
                    if d_max > 1e-12 or (d_max >= -1e-12 and d_count > 0):
                        key = (d_max if d_max > 1e-12 else 0.0, d_count, -new_R[r])
                        if best is None or key > best[0]:
                            best = (key, b, e, r)
        if best is None:
            break
        _, b, e, r = best
        held = ranks_BE[b][e]
        m = len(held)
        load_BR[b, held] -= load_BE[b, e] / m - load_BE[b, e] / (m + 1)
        load_BR[b, r] += load_BE[b, e] / (m + 1)
        held.append(r)
        free_R[r] -= 1
        added += 1
    limit = B * capacity(E, R) + replica_slots
    info = {"policy": "replicate", "method": "add-to-base", "replica_slots": replica_slots}
    if repack:
        # Copies added to a fixed base cannot help a block whose hottest expert sits alone on a
        # rank the base balanced around it (half of it moved anywhere lands on a full rank). The
        # repacked alternative (same budget) is kept when it balances better on the trace.
        alt = _repack(load_BE, R, replica_slots)
        if alt is not None:
            info.update(add_to_base_max_load_sum=_max_sum(load_BE, ranks_BE, R),
                        repack_max_load_sum=_max_sum(load_BE, alt, R))
            # Per block, the repacked layout replaces the added-copies one where it has a lower
            # max, biggest gains first, as long as every rank stays within the memory limit (so no
            # block gets worse than with copies on greedy, hence than greedy).
            count_BR = lambda lay: np.stack([np.bincount([r for held in row for r in held], minlength=R)  # noqa: E731
                                             for row in lay])
            mine_BR, alt_BR = count_BR(ranks_BE), count_BR(alt)
            gain_B = np.array([_max_sum(load_BE[b:b + 1], ranks_BE[b:b + 1], R)
                               - _max_sum(load_BE[b:b + 1], alt[b:b + 1], R) for b in range(B)])
            memory_R = mine_BR.sum(axis=0)
            switched = 0
            for b in np.argsort(-gain_B, kind="stable"):
                after_R = memory_R - mine_BR[b] + alt_BR[b]
                if gain_B[b] > 1e-9 * max(1.0, float(load_BE[b].sum())) and after_R.max() <= limit:
                    ranks_BE[b], memory_R = alt[b], after_R
                    switched += 1
            if switched:
                info["method"] = "repack" if switched == B else f"repack in {switched} of {B} blocks"
    replicas = sum(len(held) - 1 for row in ranks_BE for held in row)
    memory_R = np.bincount([r for row in ranks_BE for held in row for r in held], minlength=R)
    rank_BE = [[ranks_BE[b][e][0] for e in range(E)] for b in range(B)]
    reps = [[ranks_BE[b][e][1:] for e in range(E)] for b in range(B)]
    p = Placement.from_arrays(rank_BE, R, reps)
    info.update(replicas_added=replicas - (base.num_replicas if info["method"] == "add-to-base" else 0),
                memory_R=memory_R.tolist(), memory_limit=limit)
    return p, info


def _max_sum(load_BE: np.ndarray, ranks_BE: list[list[list[int]]], R: int) -> float:
    total = 0.0
    for b, row in enumerate(ranks_BE):
        load_R = np.zeros(R)
        for e, held in enumerate(row):
            load_R[held] += load_BE[b, e] / len(held)
        total += float(load_R.max())
    return total


def _repack(load_BE: np.ndarray, R: int, slots: int) -> Optional[list[list[list[int]]]]:
    """Replicas first, then placement (the scheme of expert-parallel load balancers): the R * slots
    extra copies go one at a time to the expert with the largest load per copy relative to its
    block's mean rank load, while that piece is bigger than an average expert slot's share
    (mean / ceil(E/R)); then every block is packed like greedy, heaviest piece first to the
    least-loaded rank that has room and no copy of that expert yet. A block's extra copies take
    free slots from the ranks in turn across blocks, so no rank gets more than `slots`.
    None if a block cannot be packed (distinct-rank rule)."""
    B, E = load_BE.shape
    cap = capacity(E, R)
    mean_B = load_BE.sum(axis=1) / R
    copies_BE = np.ones((B, E), dtype=np.int64)
    heap = [(-(load_BE[b, e] / mean_B[b]), b, e) for b in range(B) for e in range(E)
            if mean_B[b] > 0 and load_BE[b, e] > 0]
    heapq.heapify(heap)
    left = R * slots
    while left and heap:
        key, b, e = heapq.heappop(heap)
        if -key <= 1.0 / cap:        # the largest piece left is already no bigger than a slot's share
            break
        if copies_BE[b, e] >= R:     # on every rank already
            continue
        copies_BE[b, e] += 1
        left -= 1
        heapq.heappush(heap, (-(load_BE[b, e] / copies_BE[b, e] / mean_B[b]), b, e))
    extra_BR = np.zeros((B, R), dtype=np.int64)
    turn = 0
    for b in range(B):
        for _ in range(int(copies_BE[b].sum()) - E):
            extra_BR[b, turn % R] += 1
            turn += 1
    out: list[list[list[int]]] = []
    for b in range(B):
        pieces = sorted(((load_BE[b, e] / copies_BE[b, e], e) for e in range(E) for _ in range(copies_BE[b, e])),
                        key=lambda x: (-x[0], x[1]))
        held: list[list[int]] = [[] for _ in range(E)]
        load_R = np.zeros(R)
        count_R = np.zeros(R, dtype=np.int64)
        room_R = cap + extra_BR[b]
        for piece, e in pieces:
            ok = [r for r in range(R) if count_R[r] < room_R[r] and r not in held[e]]
            if not ok:
                return None
            r = min(ok, key=lambda r: (load_R[r], count_R[r], r))
            held[e].append(r)
            load_R[r] += piece
            count_R[r] += 1
        out.append(held)
    return out


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


def jsonable(x: Any) -> Any:
    """Plain JSON types (the info dicts go into placement files' meta)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x
