"""Which expert rank(s) hold each (block, expert) in a simulated deployment, as the data plane's
own `Placement` (so replicas, uneven splits and slot numbering are the real ones).

- `contiguous`: the data plane's default split (uneven when E is not a multiple of the ranks).
- `replicate` with 0 replicas: greedy balancing (`amoe_serve.placement.policies.greedy`).
- `replicate`: EPLB-style redundant experts, `replicas` extra expert copies per rank per block.
  With ranks <= experts this is `amoe_serve.placement.policies.replicate` (the `replicate`
  policy of `amoe-serve place`) on the router's expected load. That policy refuses more ranks than
  experts, so there (64 GPUs, 8 experts) the same scheme is applied directly, as DeepSeek's EPLB
  does it: every rank gets 1 + replicas slots per block, each copy goes to the expert with the
  largest load per copy, then copies are packed heaviest first onto the least-loaded rank that has
  room and no copy of that expert yet.
"""
from __future__ import annotations

import numpy as np

from amoe_serve.placement.layout import Placement
from amoe_serve.placement.policies import greedy, replicate
from amoe_serve.placement.trace import Trace

PLACEMENTS = ("contiguous", "replicate")


def make_placement(kind: str, p_BE: np.ndarray, ranks: int, replicas: int = 0) -> Placement:
    B, E = p_BE.shape
    if kind not in PLACEMENTS:
        raise ValueError(f"placement {kind!r}: expected one of {', '.join(PLACEMENTS)}")
    if ranks > E:
        return _eplb(p_BE, ranks, replicas)
    if kind == "contiguous":
        return Placement.contiguous(B, E, ranks)
    load_BE = np.rint(p_BE * 1e6).astype(np.int64)   # expected rows per expert
    t = Trace(B, E, 1, tokens_W=[int(1e6)], load_WBE=[load_BE],
              trans_WLEE=[np.zeros((max(B - 1, 0), E, E), dtype=np.int64)])
    # No copies: greedy balancing (Huang et al.); with copies: the replicate policy.
    return replicate(t, ranks, replicas * B) if replicas else greedy(t, ranks)


def _eplb(p_BE: np.ndarray, ranks: int, replicas: int) -> Placement:
    B, E = p_BE.shape
    slots = 1 + replicas
    copies = ranks * slots
    if copies < E:
        raise ValueError(f"{ranks} ranks x {slots} slots cannot hold {E} experts")
    rank_BE, reps_BE = [], []
    for b in range(B):
        n_E = np.ones(E, dtype=np.int64)
        for _ in range(copies - E):
            e = int(np.argmax(p_BE[b] / n_E))
            n_E[e] += 1
        pieces = sorted(((p_BE[b, e] / n_E[e], e) for e in range(E) for _ in range(n_E[e])),
                        key=lambda x: (-x[0], x[1]))
        load_R = np.zeros(ranks)
        count_R = np.zeros(ranks, dtype=np.int64)
        held: list[list[int]] = [[] for _ in range(E)]
        for piece, e in pieces:
            ok = [r for r in range(ranks) if count_R[r] < slots and r not in held[e]]
            r = min(ok, key=lambda r: (load_R[r], count_R[r], r))
            held[e].append(r)
            load_R[r] += piece
            count_R[r] += 1
        rank_BE.append([h[0] for h in held])
        reps_BE.append([h[1:] for h in held])
    return Placement.from_arrays(rank_BE, ranks, reps_BE)


def experts_per_rank(place: Placement) -> float:
    """Most expert copies one rank holds, per block on average (its weight memory)."""
    B = len(place.rank_BE)
    return max(len(place.pairs_of(r)) for r in range(place.expert_ranks)) / B
