"""Routing traces: per block, tokens per expert, and expert-to-expert transitions between
consecutive blocks. Recorded by every attention rank (cheap enough to leave on), merged by the
gateway, written by `amoe-serve trace`, read by `amoe-serve place`.

File format (JSON, version 1):

    {"format": "amoe-trace", "version": 1,
     "num_blocks": B, "num_experts": E, "top_k": K,
     "meta": {...},                       # how it was made (model, workload, routing)
     "windows": [                         # in time order; each covers some routed tokens
        {"tokens": n,                     # tokens routed at block 0 in this window
         "load": [[rows per expert] per block],                    # B x E
         "transitions": [[[count j at b+1 | i at b] per i] per b]  # (B-1) x E x E
        }, ...]}

A token with top-k experts S_b at block b and S_{b+1} at block b+1 adds one to
transitions[b][i][j] for every i in S_b, j in S_{b+1} (K*K pairs). Windows let a trace be cut
in time: plan on the first half, evaluate on the second.

Legend: B blocks, E experts, K top-k, T tokens, W windows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from amoe_serve.jsonfile import read_json
from amoe_serve.errors import UserInputError

FORMAT = "amoe-trace"
VERSION = 1


class TraceError(UserInputError, ValueError):
    pass


@dataclass
class Trace:
    num_blocks: int
    num_experts: int
    top_k: int
    # Per window: tokens, load_BE, trans_LEE (L = B-1 block boundaries).
    tokens_W: list[int] = field(default_factory=list)
    load_WBE: list[np.ndarray] = field(default_factory=list)
    trans_WLEE: list[np.ndarray] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    # ---- totals --------------------------------------------------------------------------
    @property
    def num_windows(self) -> int:
        return len(self.tokens_W)

    @property
    def tokens(self) -> int:
        return int(sum(self.tokens_W))

    @property
    def load_BE(self) -> np.ndarray:
        if not self.load_WBE:
            return np.zeros((self.num_blocks, self.num_experts), dtype=np.int64)
        return np.sum(self.load_WBE, axis=0)

    @property
    def trans_LEE(self) -> np.ndarray:
        if not self.trans_WLEE:
            return np.zeros((max(self.num_blocks - 1, 0), self.num_experts, self.num_experts), dtype=np.int64)
        return np.sum(self.trans_WLEE, axis=0)

    def slice(self, start: int, stop: int) -> "Trace":
        return Trace(self.num_blocks, self.num_experts, self.top_k, self.tokens_W[start:stop],
                     self.load_WBE[start:stop], self.trans_WLEE[start:stop], dict(self.meta))

    def halves(self) -> tuple["Trace", "Trace"]:
        """(first half, second half) by windows: plan on one, evaluate on the other."""
        if self.num_windows < 2:
            raise TraceError(f"the trace has {self.num_windows} window(s); halves need at least 2 "
                             "(record more tokens or a smaller window)")
        h = self.num_windows // 2
        return self.slice(0, h), self.slice(h, self.num_windows)

    # ---- merging (several attention ranks) -----------------------------------------------
    @staticmethod
    def merge(traces: list["Trace"]) -> "Trace":
        """Window i of the result adds window i of every trace (ranks run side by side)."""
        if not traces:
            raise TraceError("no traces to merge")
        t0 = traces[0]
        for t in traces[1:]:
            if (t.num_blocks, t.num_experts, t.top_k) != (t0.num_blocks, t0.num_experts, t0.top_k):
                raise TraceError("traces of different model shapes cannot be merged")
        W = max(t.num_windows for t in traces)
        out = Trace(t0.num_blocks, t0.num_experts, t0.top_k, meta=dict(t0.meta))
        for w in range(W):
            parts = [t for t in traces if w < t.num_windows]
            out.tokens_W.append(sum(t.tokens_W[w] for t in parts))
            out.load_WBE.append(np.sum([t.load_WBE[w] for t in parts], axis=0))
            out.trans_WLEE.append(np.sum([t.trans_WLEE[w] for t in parts], axis=0))
        return out

    # ---- file format ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "num_blocks": self.num_blocks,
                "num_experts": self.num_experts, "top_k": self.top_k, "meta": self.meta,
                "windows": [{"tokens": int(n), "load": l.tolist(), "transitions": t.tolist()}
                            for n, l, t in zip(self.tokens_W, self.load_WBE, self.trans_WLEE)]}

    @staticmethod
    def from_dict(d: Any, where: str = "trace") -> "Trace":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise TraceError(f"{where}: not an {FORMAT!r} file")
        if d.get("version") != VERSION:
            raise TraceError(f"{where}: version {d.get('version')!r} is not supported (this reads {VERSION})")
        try:
            B, E, K = int(d["num_blocks"]), int(d["num_experts"]), int(d["top_k"])
            t = Trace(B, E, K, meta=dict(d.get("meta") or {}))
            for i, w in enumerate(d["windows"]):
                load = np.asarray(w["load"], dtype=np.int64)
                trans = np.asarray(w["transitions"], dtype=np.int64)
                if load.shape != (B, E) or trans.shape != (max(B - 1, 0), E, E):
                    raise TraceError(f"{where}: window {i} has load {load.shape} / transitions "
                                     f"{trans.shape}, expected {(B, E)} / {(B - 1, E, E)}")
                if (load < 0).any() or (trans < 0).any():
                    raise TraceError(f"{where}: window {i} has negative counts")
                t.tokens_W.append(int(w["tokens"]))
                t.load_WBE.append(load)
                t.trans_WLEE.append(trans)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, TraceError):
                raise
            raise TraceError(f"{where}: malformed ({type(e).__name__}: {e})") from None
        return t

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @staticmethod
    def load(path: str | Path) -> "Trace":
        return Trace.from_dict(read_json(path, "trace", TraceError), f"trace file {path}")


class TraceRecorder:
    """Counts routing as attention ranks route tokens. Memory is bounded: once `max_windows`
    windows exist, neighbours are merged pairwise and the window doubles (history kept, at
    half the time resolution)."""

    def __init__(self, num_blocks: int, num_experts: int, top_k: int, window_tokens: int = 512,
                 max_windows: int = 256):
        self.B, self.E, self.K = num_blocks, num_experts, top_k
        self.window_tokens = window_tokens
        self.max_windows = max_windows
        self.trace = Trace(num_blocks, num_experts, top_k)
        self._new_window()

    def _new_window(self, device: torch.device | str = "cpu") -> None:
        self._tokens = 0
        self._load_BE = torch.zeros(self.B * self.E, dtype=torch.int64, device=device)
        self._trans_LEE = torch.zeros(max(self.B - 1, 0) * self.E * self.E, dtype=torch.int64, device=device)
        self._routed: list[tuple[int, torch.Tensor, Optional[torch.Tensor]]] = []

    def record(self, b: int, ids_TK: torch.Tensor, prev_TK: Optional[torch.Tensor]) -> None:
        """Tokens routed to ids_TK at block b; prev_TK their experts at block b-1 (None at b=0).
        Only the tensors are kept here (the rank loop pays a list append); they are counted in
        a few batched ops when the window closes or a snapshot is taken."""
        if b == 0:
            self._tokens += ids_TK.shape[0]
        self._routed.append((b, ids_TK, prev_TK if b > 0 else None))
        if b == self.B - 1 and self._tokens >= self.window_tokens:
            self.close_window()

    def _fold(self) -> None:
        """Count the routes recorded since the last fold: one bincount for the loads and one
        for the transitions, over all of them."""
        routed, self._routed = self._routed, []
        if not routed:
            return
        E, dev = self.E, routed[0][1].device
        if self._load_BE.device != dev:
            self._load_BE, self._trans_LEE = self._load_BE.to(dev), self._trans_LEE.to(dev)
        # One cat per kind over all entries (every entry is [T_i, K]), not ops per entry.
        T_N = torch.tensor([r[1].shape[0] for r in routed], device=dev)
        ids_XK = torch.cat([r[1] for r in routed]).detach().long()
        base_X = torch.repeat_interleave(torch.tensor([r[0] * E for r in routed], device=dev), T_N)
        self._load_BE += torch.bincount((ids_XK + base_X[:, None]).reshape(-1), minlength=self.B * E)
        pairs = [(b, cur, prev) for b, cur, prev in routed if prev is not None]
        if pairs:
            cur_XK = torch.cat([p[1] for p in pairs]).detach().long()
            prev_XK = torch.cat([p[2] for p in pairs]).detach().long()
            base_X = torch.repeat_interleave(torch.tensor([(b - 1) * E * E for b, _, _ in pairs], device=dev),
                                             torch.tensor([p[1].shape[0] for p in pairs], device=dev))
            pair_XKK = prev_XK[:, :, None] * E + cur_XK[:, None, :] + base_X[:, None, None]
            self._trans_LEE += torch.bincount(pair_XKK.reshape(-1), minlength=self._trans_LEE.numel())

    def close_window(self) -> None:
        self._fold()
        if self._tokens == 0 and not bool(self._load_BE.any()):
            return
        t = self.trace
        t.tokens_W.append(self._tokens)
        load_BE, trans_LEE = self._open_counts()
        t.load_WBE.append(load_BE)
        t.trans_WLEE.append(trans_LEE)
        self._new_window(self._load_BE.device)
        if t.num_windows >= self.max_windows:
            self._halve()

    def _halve(self) -> None:
        t = self.trace
        W = t.num_windows - t.num_windows % 2
        merged = Trace(t.num_blocks, t.num_experts, t.top_k, meta=t.meta)
        for i in range(0, W, 2):
            merged.tokens_W.append(t.tokens_W[i] + t.tokens_W[i + 1])
            merged.load_WBE.append(t.load_WBE[i] + t.load_WBE[i + 1])
            merged.trans_WLEE.append(t.trans_WLEE[i] + t.trans_WLEE[i + 1])
        if W < t.num_windows:
            merged.tokens_W.append(t.tokens_W[-1])
            merged.load_WBE.append(t.load_WBE[-1])
            merged.trans_WLEE.append(t.trans_WLEE[-1])
        self.trace = merged
        self.window_tokens *= 2

    def snapshot(self) -> Trace:
        """The closed windows plus the open one (without closing it)."""
        self._fold()
        t = self.trace
        out = Trace(t.num_blocks, t.num_experts, t.top_k, list(t.tokens_W), list(t.load_WBE),
                    list(t.trans_WLEE), dict(t.meta))
        if self._tokens or bool(self._load_BE.any()):
            out.tokens_W.append(self._tokens)
            load_BE, trans_LEE = self._open_counts()
            out.load_WBE.append(load_BE)
            out.trans_WLEE.append(trans_LEE)
        return out

    def _open_counts(self) -> tuple[np.ndarray, np.ndarray]:
        self._fold()
        return (self._load_BE.view(self.B, self.E).cpu().numpy().copy(),
                self._trans_LEE.view(max(self.B - 1, 0), self.E, self.E).cpu().numpy().copy())
