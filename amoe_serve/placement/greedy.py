"""`contiguous` and `greedy` (Huang et al.): per block, experts by historical load, heaviest
first, each to the least-loaded rank that still has room (ceil(E/R) experts per rank).

Legend: B blocks, E experts per block, R expert ranks.
"""

from __future__ import annotations


import numpy as np

from amoe_serve.placement.layout import Placement
from amoe_serve.placement.trace import Trace
from amoe_serve.placement.objective import capacity, check_ranks


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
