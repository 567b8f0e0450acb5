"""`ilp`: MoETuner's two stages solved with HiGHS (scipy.optimize.milp); see `policies.py`
for the method and its guarantee (never worse than greedy on the objective).

Legend: B blocks, E experts per block, R expert ranks, G groups of stage 1 (G = R),
L = B-1 block boundaries, V MILP variables.
"""

from __future__ import annotations

import contextlib
import ctypes
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

from amoe_serve.placement.layout import Placement
from amoe_serve.placement.trace import Trace
from amoe_serve.placement.greedy import greedy_ranks_BE
from amoe_serve.placement.objective import capacity, check_ranks, cost_matrix, objective, rank_loads_BR


log = logging.getLogger("amoe_serve.placement")

# Above this many variables the joint stage-2 MILP is not attempted (block-by-block instead).
STAGE2_MAX_VARS = 60_000
# Up to this many ranks stage 2 with a non-uniform cost matrix is solved exactly by dynamic
# programming (R! states per block); the MILP's relaxation is weak there.
STAGE2_DP_MAX_RANKS = 6


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
