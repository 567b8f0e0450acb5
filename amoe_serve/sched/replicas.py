"""How a replicated expert's rows are shared among the ranks holding it: the expert's rows, in
row order, are cut into n nearly equal contiguous parts, part i to its i-th rank (primary
first); row at position p goes to part floor(p * n / count). `AttentionCore._owners` does this
per row; the simulator needs only the counts, which this gives (tests/sched check they agree)."""

from __future__ import annotations

import numpy as np


def replica_shares(count: int, n: int) -> list[int]:
    """Rows of each of the n parts of `count` rows."""
    if n <= 1:
        return [int(count)]
    # #{p in [0, count): floor(p n / count) = i} = ceil((i+1) count / n) - ceil(i count / n)
    edges = -(-np.arange(n + 1, dtype=np.int64) * int(count) // n)
    return np.diff(edges).tolist()


def replica_shares_E(count_E: np.ndarray, n_E: np.ndarray, M: int) -> np.ndarray:
    """Vectorized: rows of part i of expert e, shape [E, M] (parts beyond n_E[e] are 0)."""
    count_E = np.asarray(count_E, dtype=np.int64)
    n_E = np.asarray(n_E, dtype=np.int64)
    i_M = np.arange(M + 1, dtype=np.int64)
    edges_EM = -(-i_M[None, :] * count_E[:, None] // n_E[:, None])
    edges_EM = np.minimum(edges_EM, count_E[:, None])
    return np.diff(edges_EM, axis=1)
