"""Expert Buffering (Huang et al., "Towards MoE Deployment", arXiv 2303.06182): an expert rank
keeps only S of the experts it owns in fast memory (GPU memory; on CPU a resident set of weight
tensors) and reads the others on demand from the memory-mapped safetensors checkpoint.

Slots are one stack per weight (w1_SFD, w3_SFD, w2_SDF), shared by every block, so a grouped
call still indexes one stack. A call that needs more distinct experts than S runs in sub-groups
of <= S experts; each row's output is computed by the same kernel on the same weights, so the
result is bit-identical to the all-resident ExpertSide.

Eviction: never an expert of the sub-group about to run (or one being loaded); then prefer
experts not active in the current batch (no rows still to run); among those the policy decides:
LIFO (the paper's: the most recently loaded goes first), LRU or FIFO.

Overlap: while a sub-group computes, the missing experts of the next sub-group (after the last
one: the experts the caller expects next; ExpertCore names the queued ones, then those the next
block ran last time) are copied on one background thread, so the copy also overlaps the
attention ranks' work and the token exchange. A prefetch only ever evicts an inactive expert,
so it cannot push out something already queued. Counters: a lookup that finds its expert
resident (prefetched ones too) is a hit, one that must load first is a miss; `loads` counts
every copy (misses + prefetches), `wait_s` the compute thread's time waiting for copies.
On CPU the "load" is a copy out of the page cache into the resident tensors, done by the same
cores that compute, so the overlap competes with compute instead of using a separate DMA engine.

Legend: S slots, F expert ffn, D hidden, R rows, G experts in a grouped call; key = (block, expert).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

import amoe_kernels as K

from .checkpoint import ExpertReader
from .spec import CheckpointError, ModelSpec

Key = tuple[int, int]

# ---------------------------------------------------------------- eviction policies

class Eviction:
    """Bookkeeping of the resident keys; `victim` picks among the candidates it is given."""

    name = "?"

    def __init__(self) -> None:
        self._tick = 0
        self._stamp: dict[Key, int] = {}

    def _now(self) -> int:
        self._tick += 1
        return self._tick

    def loaded(self, key: Key) -> None:
        self._stamp[key] = self._now()

    def used(self, key: Key) -> None:
        pass

    def dropped(self, key: Key) -> None:
        self._stamp.pop(key, None)

    def victim(self, candidates: Iterable[Key]) -> Key:
        raise NotImplementedError


class LIFOEviction(Eviction):
    """Last loaded, first evicted: with blocks visited in a cycle this keeps a stable set
    resident instead of thrashing, which is why the paper finds it close to Belady."""
    name = "lifo"

    def victim(self, candidates: Iterable[Key]) -> Key:
        return max(candidates, key=self._stamp.__getitem__)


class FIFOEviction(Eviction):
    name = "fifo"

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(candidates, key=self._stamp.__getitem__)


class LRUEviction(Eviction):
    name = "lru"

    def used(self, key: Key) -> None:
        self._stamp[key] = self._now()

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(candidates, key=self._stamp.__getitem__)


POLICIES = {p.name: p for p in (LIFOEviction, LRUEviction, FIFOEviction)}


def make_eviction(name: str) -> Eviction:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"expert_buffer.eviction={name!r}: expected one of {', '.join(POLICIES)}") from None


class BeladyEviction(Eviction):
    """Offline optimum for replays (it needs the future): evict the expert used again last.
    `uses[key]`: the access positions of key in the replayed trace; `now` is set by the replay."""
    name = "belady"

    def __init__(self, uses: dict[Key, list[int]]) -> None:
        super().__init__()
        self.uses = uses
        self.now = -1

    def _next(self, key: Key) -> float:
        pos = self.uses.get(key, [])
        i = bisect.bisect_right(pos, self.now)
        return pos[i] if i < len(pos) else float("inf")

    def victim(self, candidates: Iterable[Key]) -> Key:
        return max(candidates, key=self._next)


def split_groups(keys: list[Key], S: int) -> list[list[int]]:
    """Indices of keys, in order, cut into runs of <= S distinct keys."""
    groups: list[list[int]] = [[]]
    distinct: set[Key] = set()
    for i, k in enumerate(keys):
        if k not in distinct and len(distinct) == S:
            groups.append([])
            distinct = set()
        distinct.add(k)
        groups[-1].append(i)
    return groups


def replay(trace: list[list[Key]], pairs: list[Key], S: int, eviction: str) -> tuple[int, int]:
    """(hits, misses) of a store with S slots and no prefetch over a recorded trace: the same
    warm start, sub-groups and victim rule as BufferedExpertSide, without the weights. eviction
    may also be "belady" (the offline optimum under the same never-evict-the-group rule)."""
    pairs = sorted(pairs)
    S = min(S, len(pairs))
    if eviction == "belady":
        uses: dict[Key, list[int]] = {}
        pos = 0
        for keys in trace:
            for k in keys:
                uses.setdefault(k, []).append(pos)
                pos += 1
        policy: Eviction = BeladyEviction(uses)
    else:
        policy = make_eviction(eviction)
    resident: dict[Key, None] = {}
    for k in pairs[:S]:
        resident[k] = None
        policy.loaded(k)
    hits = misses = pos = 0
    for keys in trace:
        groups = split_groups(keys, S)
        for gi, idx in enumerate(groups):
            sub = [keys[i] for i in idx]
            later = {keys[i] for g in groups[gi + 1:] for i in g}
            for k in sub:
                if isinstance(policy, BeladyEviction):
                    policy.now = pos
                pos += 1
                if k in resident:
                    hits += 1
                    policy.used(k)
                    continue
                misses += 1
                if len(resident) >= S:
                    v = pick_victim(policy, list(resident), set(sub), later)
                    del resident[v]
                    policy.dropped(v)
                resident[k] = None
                policy.loaded(k)
                policy.used(k)
    return hits, misses


def pick_victim(policy: Eviction, resident: Iterable[Key], keep: set[Key], active: set[Key] = frozenset()
                ) -> Optional[Key]:
    """Never one of `keep`; an inactive one when there is any; None when every resident is kept."""
    allowed = [k for k in resident if k not in keep]
    if not allowed:
        return None
    idle = [k for k in allowed if k not in active]
    return policy.victim(idle or allowed)


# ---------------------------------------------------------------- checkpoint reader

# ---------------------------------------------------------------- the buffered store

class BufferedExpertSide:
    """ExpertSide's interface (run, run_grouped, dtype, pairs) over S resident slots."""

    @property
    def wants_upcoming(self) -> bool:
        """ExpertCore passes the next queued experts as prefetch hints unless all are resident."""
        return self.S < len(self.pairs)

    def __init__(self, spec: ModelSpec, reader: ExpertReader, pairs: Iterable[tuple[int, int]], slots: int,
                 eviction: str = "lifo", dtype: Optional[torch.dtype] = None, device: str | torch.device = "cpu",
                 prefetch: bool = True, record: bool = False, compute_dtype: Optional[torch.dtype] = None):
        if slots < 1:
            raise ValueError(f"expert buffer needs >= 1 slot, got {slots}")
        self.spec = spec
        self.reader = reader
        self.pairs = sorted({(int(b), int(e)) for b, e in pairs})
        if not self.pairs:
            raise ValueError("an expert buffer needs at least one expert pair")
        for b, e in self.pairs:
            if not (0 <= b < spec.num_blocks and 0 <= e < spec.num_experts):
                raise ValueError(f"expert pair {(b, e)} out of range: {spec.num_blocks} blocks x {spec.num_experts} experts")
            if not reader.has(b, e):
                raise CheckpointError(f"{reader.path}: missing expert tensors for ({b}, {e})")
        self._held = set(self.pairs)
        # Every step's experts, when recording (offline replay of eviction policies).
        self.trace: Optional[list[list[Key]]] = [] if record else None
        self.S = min(int(slots), len(self.pairs))   # more slots than experts buys nothing
        self.policy = make_eviction(eviction)
        self.device = torch.device(device)
        dtype = reader.dtype(*self.pairs[0]) if dtype is None else dtype
        self._compute_dtype = compute_dtype
        F, D = self.spec.expert_intermediate_size, self.spec.hidden_size
        self.w1_SFD = torch.empty(self.S, F, D, dtype=dtype, device=self.device)
        self.w3_SFD = torch.empty(self.S, F, D, dtype=dtype, device=self.device)
        self.w2_SDF = torch.empty(self.S, D, F, dtype=dtype, device=self.device)
        self.slot_of: dict[Key, int] = {}
        self.key_in: list[Optional[Key]] = [None] * self.S
        self._pending: dict[Key, Future] = {}
        self._prefetch_on = prefetch
        self._pool: Optional[ThreadPoolExecutor] = None
        self._stream = None
        self._lock = threading.Lock()   # counters written by the prefetch thread
        self.hits = self.misses = self.loads = self.prefetches = self.evictions = 0
        self.load_s = 0.0   # time spent copying experts in (either thread)
        self.wait_s = 0.0   # time the compute thread waited for a copy: what overlap did not hide
        # Start warm: the first S experts, as a server fills its slots at start-up (not counted).
        for s, key in enumerate(self.pairs[:self.S]):
            self._copy_in(key, s)
            self._place(key, s)
        self.loads = 0
        self.load_s = 0.0

    @classmethod
    def load(cls, path: str | Path, spec: ModelSpec, dtype: Optional[torch.dtype], pairs: Iterable[tuple[int, int]],
             slots: int, eviction: str = "lifo", device: str | torch.device = "cpu", prefetch: bool = True,
             record: bool = False, compute_dtype: Optional[torch.dtype] = None) -> "BufferedExpertSide":
        return cls(spec, ExpertReader(path, spec), pairs, slots, eviction, dtype, device, prefetch, record,
                   compute_dtype)

    # ------------------------------------------------------------ slots

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (weights may rest narrower: `w1_SFD.dtype`)."""
        return self._compute_dtype or self.w1_SFD.dtype

    def resident(self) -> list[Key]:
        return [k for k in self.key_in if k is not None]

    def _place(self, key: Key, slot: int) -> None:
        old = self.key_in[slot]
        if old is not None:
            del self.slot_of[old]
            self.policy.dropped(old)
            self.evictions += 1
        self.key_in[slot] = key
        self.slot_of[key] = slot
        self.policy.loaded(key)

    def _copy_in(self, key: Key, slot: int, after=None) -> None:
        t0 = time.perf_counter()
        if self.device.type == "cpu" and self.w1_SFD.dtype == self.reader.dtype(*key):
            # Read straight into the slot (only an inactive slot is ever the target).
            self.reader.read(*key, out=(self.w1_SFD[slot], self.w3_SFD[slot], self.w2_SDF[slot]))
            self._count_load(time.perf_counter() - t0)
            return
        w1, w3, w2 = self.reader.read(*key)
        if self.device.type == "cuda" and after is not None:
            # Prefetch on a side stream: first wait for every kernel launched before the
            # prefetch was issued (one may still read the victim slot).
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(after)
                self._copy_weights(slot, w1, w3, w2)
            self._stream.synchronize()
        else:
            self._copy_weights(slot, w1, w3, w2)
        self._count_load(time.perf_counter() - t0)

    def _count_load(self, dt: float) -> None:
        with self._lock:
            self.loads += 1
            self.load_s += dt

    def _copy_weights(self, slot: int, w1, w3, w2) -> None:
        # copy_ casts like ExpertSide's _cast (t.to(dtype)), so the values are identical.
        self.w1_SFD[slot].copy_(w1)
        self.w3_SFD[slot].copy_(w3)
        self.w2_SDF[slot].copy_(w2)

    def _free_slot(self) -> Optional[int]:
        for s, k in enumerate(self.key_in):
            if k is None:
                return s
        return None

    def _settle(self, key: Key) -> None:
        fut = self._pending.pop(key, None)
        if fut is not None:
            t0 = time.perf_counter()
            fut.result()
            self.wait_s += time.perf_counter() - t0

    def _acquire(self, keys: list[Key], active: set[Key]) -> list[int]:
        """Make every key resident (loading misses now); their slots, in order."""
        need = set(keys)
        for key in keys:
            if key in self.slot_of:
                self._settle(key)
                self.hits += 1
                self.policy.used(key)
                continue
            self.misses += 1
            slot = self._free_slot()
            if slot is None:
                victim = pick_victim(self.policy, self.resident(), need | set(self._pending), active)
                if victim is None:   # every other slot is mid-prefetch: let those land first
                    for k in list(self._pending):
                        self._settle(k)
                    victim = pick_victim(self.policy, self.resident(), need, active)
                slot = self.slot_of[victim]
            t0 = time.perf_counter()
            self._copy_in(key, slot)
            self.wait_s += time.perf_counter() - t0
            self._place(key, slot)
            self.policy.used(key)
        return [self.slot_of[k] for k in keys]

    def prefetch(self, keys: Iterable[Key], keep: Iterable[Key] = (), active: Iterable[Key] = ()) -> int:
        """Start loading missing keys in the background, evicting only experts that are neither
        kept (about to run) nor active (rows queued); returns how many loads were started."""
        if not self._prefetch_on:
            return 0
        keep = set(keep)
        active = set(active) | set(keys)
        started = 0
        for key in keys:
            if key in self.slot_of or key not in self._held:
                continue
            slot = self._free_slot()
            if slot is None:
                victim = pick_victim(self.policy, self.resident(), keep | set(self._pending) | active)
                if victim is None:
                    break
                slot = self.slot_of[victim]
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="expert-prefetch")
                if self.device.type == "cuda":
                    self._stream = torch.cuda.Stream(self.device)
            after = None
            if self.device.type == "cuda":
                after = torch.cuda.Event()
                after.record(torch.cuda.current_stream(self.device))
            self._place(key, slot)
            self._pending[key] = self._pool.submit(self._copy_in, key, slot, after)
            self.prefetches += 1
            started += 1
        return started

    # ------------------------------------------------------------ compute

    def _check(self, b: int, experts: list[int]) -> list[Key]:
        keys = [(b, int(e)) for e in experts]
        for k in keys:
            if k not in self._held:
                raise ValueError(f"expert {k} is not held by this ExpertSide")
        return keys

    @torch.inference_mode()
    def run(self, b: int, e: int, y_RD: torch.Tensor) -> torch.Tensor:
        return self.run_grouped(b, [e], [y_RD.shape[0]], y_RD)

    @torch.inference_mode()
    def run_grouped(self, b: int, experts: list[int], counts: list[int], y_RD: torch.Tensor,
                    upcoming: Iterable[Key] = ()) -> torch.Tensor:
        """Same contract as ExpertSide.run_grouped. `upcoming`: (block, expert) keys likely to run
        next (the caller's queued experts), prefetched while the last sub-group computes."""
        keys = self._check(b, list(experts))
        counts = [int(c) for c in counts]
        if sum(counts) != y_RD.shape[0]:
            raise ValueError(f"counts sum to {sum(counts)} but {y_RD.shape[0]} rows were given")
        if self.trace is not None:
            self.trace.append(keys)
        if self.S == len(self.pairs):   # everything resident: exactly ExpertSide's one call
            self.hits += len(keys)
            return K.grouped_expert_ffn(y_RD, counts, self.w1_SFD, self.w3_SFD, self.w2_SDF,
                                        experts=[self.slot_of[k] for k in keys])
        groups = split_groups(keys, self.S)
        upcoming = [k for k in upcoming if k not in set(keys)]
        out_RD = None if len(groups) == 1 else torch.empty_like(y_RD)
        start = 0
        for gi, idx in enumerate(groups):
            sub = [keys[i] for i in idx]
            later = {keys[i] for g in groups[gi + 1:] for i in g}
            slots = self._acquire(sub, later)
            nxt = [keys[i] for i in groups[gi + 1]] if gi + 1 < len(groups) else upcoming
            self.prefetch(nxt, keep=sub, active=later | set(upcoming))
            n = sum(counts[i] for i in idx)
            part = K.grouped_expert_ffn(y_RD[start:start + n], [counts[i] for i in idx],
                                        self.w1_SFD, self.w3_SFD, self.w2_SDF, experts=slots)
            if out_RD is None:
                return part
            out_RD[start:start + n] = part
            start += n
        return out_RD

    def stats(self) -> dict:
        used = self.hits + self.misses
        return {"slots": self.S, "held": len(self.pairs), "eviction": self.policy.name,
                "hits": self.hits, "misses": self.misses, "hit_rate": self.hits / used if used else 1.0,
                "loads": self.loads, "prefetches": self.prefetches, "evictions": self.evictions,
                "load_s": self.load_s, "wait_s": self.wait_s,
                **({"pairs": [list(k) for k in self.pairs], "accesses": [[list(k) for k in step] for step in self.trace]}
                   if self.trace is not None else {})}

    def close(self) -> None:
        for k in list(self._pending):
            self._settle(k)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
