"""`replicate`: from greedy (or a given base), extra copies of the hottest experts on other
ranks under a per-rank memory budget, each placed where it lowers the block's max rank load
most; a replicated expert's rows are split evenly over its ranks.

Legend: B blocks, E experts per block, R expert ranks, N replica slots per rank.
"""

from __future__ import annotations

import heapq
from typing import Optional

import numpy as np

from amoe_serve.placement.layout import Placement, PlacementError
from amoe_serve.placement.trace import Trace
from amoe_serve.placement.greedy import greedy
from amoe_serve.placement.objective import capacity, check_ranks


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
