"""What every policy is judged by: per-rank capacity, the rank-pair cost matrix, rank loads,
cross-rank traffic between consecutive blocks, and the (max-load sum, traffic) objective;
plus `jsonable` for the info dicts.

Legend: B blocks, E experts per block, R expert ranks, L = B-1 block boundaries.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from amoe_serve.placement.layout import PlacementError
from amoe_serve.placement.trace import Trace


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
