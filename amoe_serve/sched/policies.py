"""Queue-selection policies over the μ-queue length matrix.

Legend: NB = number of blocks (layers), NS = slots per block (local experts on an
expert rank, 1 on an attention rank). Q_BS is the token-count matrix [NB, NS].

Every policy is a pure function of Q_BS (no clock, no rank state) so the same
objects run in the server and in a discrete-event simulator. Each `pick` returns
the (block, slot) to run next, or None when every queue is empty.
Ties always resolve to the lowest block, then the lowest slot (numpy argmax on the
row-major flattening gives exactly that order).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

POLICIES = ("defrag", "mtfs", "flfs")


@runtime_checkable
class Scheduler(Protocol):
    def pick(self, Q_BS: np.ndarray) -> tuple[int, int] | None: ...


def _as_matrix(Q_BS: np.ndarray) -> np.ndarray:
    Q_BS = np.asarray(Q_BS)
    if Q_BS.ndim != 2:
        raise ValueError(f"queue-length matrix must be 2-D [blocks, slots], got shape {Q_BS.shape}")
    return Q_BS


def _unravel(flat: int, Q_BS: np.ndarray) -> tuple[int, int]:
    b, s = divmod(int(flat), Q_BS.shape[1])
    return b, s


class MTFS:
    """Most tokens first: the single longest queue."""

    name = "mtfs"

    def pick(self, Q_BS: np.ndarray) -> tuple[int, int] | None:
        Q_BS = _as_matrix(Q_BS)
        flat = int(np.argmax(Q_BS))
        if Q_BS.flat[flat] <= 0:
            return None
        return _unravel(flat, Q_BS)


class FLFS:
    """First layer first: lowest non-empty block, then its longest slot.

    Livelocks under steady arrivals at block 0 (see tests/sched/test_livelock.py);
    kept as a baseline.
    """

    name = "flfs"

    def pick(self, Q_BS: np.ndarray) -> tuple[int, int] | None:
        Q_BS = _as_matrix(Q_BS)
        busy_blocks = np.flatnonzero(Q_BS.any(axis=1))
        if busy_blocks.size == 0:
            return None
        b = int(busy_blocks[0])
        return b, int(np.argmax(Q_BS[b]))


class Defrag:
    """Defragmenting policy: prefer queues whose downstream blocks already hold work.

    LScore_b = sum_{k=1..K} mean_s(Q[(b+k) mod NB]) * decay^k
    Score[b, s] = LScore_b + Q[b, s] for non-empty queues; run the argmax.
    Running b pushes its tokens into b+1, so a high LScore means they will merge
    with tokens already waiting there instead of forming an orphan small batch.
    """

    name = "defrag"

    def __init__(self, lookahead: int = 3, decay: float = 0.8) -> None:
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        if not (0.0 <= decay <= 1.0):
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.lookahead = int(lookahead)
        self.decay = float(decay)
        # decay^k for k = 1..K, computed once.
        self._w_K = self.decay ** np.arange(1, self.lookahead + 1, dtype=np.float64)
        self._W_cache: dict[int, np.ndarray] = {}

    def lscore(self, Q_BS: np.ndarray) -> np.ndarray:
        """Look-ahead score per block, shape [NB]: one mat-vec with a cached [NB, NB] matrix
        W[b, (b+k) mod NB] = decay^k (a rank picks a queue every loop: this is its hot path)."""
        Q_BS = _as_matrix(Q_BS)
        mean_B = Q_BS.sum(axis=1, dtype=np.float64) / Q_BS.shape[1]
        return self._weights(Q_BS.shape[0]) @ mean_B

    def _weights(self, NB: int) -> np.ndarray:
        W = self._W_cache.get(NB)
        if W is None:
            W = np.zeros((NB, NB))
            for k in range(1, self.lookahead + 1):  # offsets, once per block count
                W[np.arange(NB), (np.arange(NB) + k) % NB] += self._w_K[k - 1]
            W = self._W_cache[NB] = W
        return W

    def scores(self, Q_BS: np.ndarray) -> np.ndarray:
        """Score matrix [NB, NS]; empty queues are -inf so they are never chosen."""
        Q_BS = _as_matrix(Q_BS)
        score_BS = self.lscore(Q_BS)[:, None] + Q_BS
        return np.where(Q_BS > 0, score_BS, -np.inf)

    def pick(self, Q_BS: np.ndarray) -> tuple[int, int] | None:
        Q_BS = _as_matrix(Q_BS)
        busy = np.flatnonzero(Q_BS)
        if busy.size <= 1:  # nothing, or the one choice (a single wave in flight): no scoring
            return None if busy.size == 0 else _unravel(int(busy[0]), Q_BS)
        NS = Q_BS.shape[1]
        if busy[0] // NS == busy[-1] // NS:  # one block's queues (one dispatch landed): its longest
            b = int(busy[0]) // NS
            return b, int(np.argmax(Q_BS[b]))
        score_BS = self.scores(Q_BS)
        return _unravel(int(np.argmax(score_BS)), Q_BS)


def pick_block_group(Q_BS: np.ndarray, block: int) -> list[int]:
    """Non-empty slots of `block`, ascending: run together as one grouped GEMM."""
    Q_BS = _as_matrix(Q_BS)
    if not 0 <= block < Q_BS.shape[0]:
        raise ValueError(f"block {block} out of range for {Q_BS.shape[0]} blocks")
    return np.flatnonzero(Q_BS[block] > 0).tolist()


def make_scheduler(policy: str, lookahead: int = 3, decay: float = 0.8) -> Scheduler:
    key = policy.lower() if isinstance(policy, str) else policy
    if key == "defrag":
        return Defrag(lookahead=lookahead, decay=decay)
    if key == "mtfs":
        return MTFS()
    if key == "flfs":
        return FLFS()
    raise ValueError(f"unknown scheduling policy {policy!r}; options: {', '.join(POLICIES)}")
