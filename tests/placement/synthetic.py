"""Synthetic routing traces for tests and offline placement studies (no model needed).

Popularity follows the AMoE paper's exponential skew, p(e) ~ exp(-rate * popularity rank); with
`clustered=True` expert e has popularity rank e in every block, so the hot experts sit next to
each other and the contiguous placement puts them on the same rank (its worst case). Consecutive
blocks are correlated: each of a token's K slots follows a fixed "successor" expert of its
previous expert with probability `follow`, else it draws from the popularity; that gives the
transition matrix structure stage 2 of the ILP exploits.

Legend: B blocks, E experts, K top-k, T tokens, W windows, L = B-1 block boundaries.
"""

from __future__ import annotations

import numpy as np

from amoe_serve.placement.trace import Trace


def synthetic_trace(num_blocks: int = 8, num_experts: int = 16, top_k: int = 2, tokens: int = 4096,
                    windows: int = 4, rate: float = 0.3, follow: float = 0.5, clustered: bool = True,
                    seed: int = 0) -> Trace:
    B, E, K = num_blocks, num_experts, top_k
    if not 1 <= K <= E:
        raise ValueError(f"top_k={K} must be in [1, {E}]")
    rng = np.random.default_rng(seed)
    decay_E = np.exp(-rate * np.arange(E))
    # rank_of_BE[b, e]: popularity rank of expert e in block b.
    rank_of_BE = (np.tile(np.arange(E), (B, 1)) if clustered
                  else np.stack([rng.permutation(E) for _ in range(B)]))
    p_BE = decay_E[rank_of_BE]
    p_BE /= p_BE.sum(axis=1, keepdims=True)
    # succ_LE[l, i]: the expert at block l+1 that tokens of expert i at block l tend to follow.
    succ_LE = np.stack([rng.permutation(E) for _ in range(max(B - 1, 0))]) if B > 1 else np.zeros((0, E), int)

    t = Trace(B, E, K, meta={"synthetic": {"rate": rate, "follow": follow, "clustered": clustered,
                                           "seed": seed}})
    per_W = np.diff(np.linspace(0, tokens, windows + 1).astype(int))
    for T in per_W:
        load_BE = np.zeros((B, E), dtype=np.int64)
        trans_LEE = np.zeros((max(B - 1, 0), E, E), dtype=np.int64)
        prev_TK = None
        for b in range(B):
            ids_TK = _draw(rng, p_BE[b], T, K,
                           None if prev_TK is None else succ_LE[b - 1][prev_TK], follow)
            load_BE[b] = np.bincount(ids_TK.reshape(-1), minlength=E)
            if prev_TK is not None:
                pair = (prev_TK[:, :, None] * E + ids_TK[:, None, :]).reshape(-1)
                trans_LEE[b - 1] = np.bincount(pair, minlength=E * E).reshape(E, E)
            prev_TK = ids_TK
        t.tokens_W.append(int(T))
        t.load_WBE.append(load_BE)
        t.trans_WLEE.append(trans_LEE)
    return t


def _draw(rng: np.random.Generator, p_E: np.ndarray, T: int, K: int, pref_TK, follow: float) -> np.ndarray:
    """K distinct experts per token: slot k keeps pref_TK[:, k] with probability `follow`, the rest
    are drawn by popularity without replacement (Gumbel top-k: keys log p + Gumbel, forced = +inf)."""
    E = p_E.shape[0]
    keys_TE = np.log(np.maximum(p_E, 1e-300))[None, :] + rng.gumbel(size=(T, E))
    if pref_TK is not None:
        keep_TK = rng.random((T, K)) < follow
        rows_T = np.repeat(np.arange(T)[:, None], K, axis=1)
        keys_TE[rows_T[keep_TK], pref_TK[keep_TK]] = np.inf
    return np.argsort(-keys_TE, axis=1, kind="stable")[:, :K]
