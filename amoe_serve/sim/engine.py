"""Discrete-event simulation of AEP and lockstep MoE serving on a cluster.

Event engine: a heap of (time, seq, callback, args); seq breaks ties in insertion order, so a
seed fixes every result. Shared pieces: `Router` (seeded exponential skew over experts),
`Net` (per-sender serialized links with latency), `Cores` (at most C ranks compute at once on
a CPU machine), `Gateway` (requests, placement on the attention rank with the fewest running
requests, i.e. the most free KV), `Stats` (token times -> throughput / ITL / TTFT).

AEP (`simulate_aep`): attention ranks (DP, sticky requests) each own a MuQueues(NB, W) whose slot
is the request's micro-wave, gated by `amoe_serve.sched.waves.WaveGate` exactly as the real
attention rank does (the sim clock is its `now`; a wake-up event stands in for the real rank's
polling when a gated queue's max_wait expires); expert ranks own MuQueues(NB, experts per rank);
every rank, when idle, asks its scheduler from `amoe_serve.sched.policies.make_scheduler` which
queue to run -- the same classes the real ranks use. No barriers anywhere.

Lockstep (`simulate_lockstep`): every block of every iteration is a barrier step whose time is
max_r attention + all-to-all dispatch + max_r experts + all-to-all combine.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from amoe_serve.sched.policies import make_scheduler, pick_block_group
from amoe_serve.sched.queues import MuQueues
from amoe_serve.sched.waves import WaveGate

from .cost import CostModel


# ---------------------------------------------------------------------------------------------
# engine and shared pieces
# ---------------------------------------------------------------------------------------------
class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list = []
        self._seq = 0
        self.events = 0

    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._heap, (t, self._seq, fn, args))
        self._seq += 1

    def run(self, until: float | None = None) -> None:
        heap = self._heap
        while heap:
            if until is not None and heap[0][0] > until:
                self.now = until
                return
            t, _, fn, args = heapq.heappop(heap)
            self.now = t
            self.events += 1
            fn(*args)


class Router:
    """Seeded routing: expert of popularity rank i has probability ~ exp(-rate * i).

    With per_block the hottest expert of each block is a different (seeded) expert. top-k
    without replacement by Gumbel-top-k (Plackett-Luce) over the same probabilities.
    """

    def __init__(self, num_experts: int, top_k: int, rate: float, num_blocks: int,
                 per_block: bool, seed: int) -> None:
        self.E, self.k = num_experts, top_k
        rng = np.random.default_rng(seed)
        base = np.exp(-rate * np.arange(num_experts))
        base /= base.sum()
        self.p_BE = np.empty((num_blocks, num_experts))
        perm = rng.permutation(num_experts)
        for b in range(num_blocks):
            if per_block:
                perm = rng.permutation(num_experts)
            self.p_BE[b, perm] = base
        self.cdf_BE = np.cumsum(self.p_BE, axis=1)
        self.cdf_BE[:, -1] = 1.0
        with np.errstate(divide="ignore"):
            self.logp_BE = np.log(self.p_BE)
        self.rng = np.random.default_rng(seed + 1)

    def route(self, block: int, tokens: int) -> np.ndarray:
        """Expert ids, shape [tokens, k]."""
        if self.k == 1:
            return np.searchsorted(self.cdf_BE[block], self.rng.random(tokens), side="right")[:, None]
        g = self.logp_BE[block] + self.rng.gumbel(size=(tokens, self.E))
        return np.argpartition(-g, self.k - 1, axis=1)[:, : self.k]

    def counts(self, block: int, seg_tokens: list[int]) -> np.ndarray:
        """Rows per (segment, expert) for segments of the given token counts, [S, E]."""
        S = len(seg_tokens)
        T = sum(seg_tokens)
        ids = self.route(block, T)
        seg = np.repeat(np.arange(S), seg_tokens)
        flat = (seg[:, None] * self.E + ids).ravel()
        return np.bincount(flat, minlength=S * self.E).reshape(S, self.E)


class Net:
    """Messages from one GPU serialize on its link of each kind (intra / inter node)."""

    def __init__(self, cost: CostModel, node_of: list[int]) -> None:
        self.cost = cost
        self.node_of = node_of
        self.free = {}
        self.bytes = 0.0
        self.messages = 0

    def send(self, now: float, src: int, dst: int, nbytes: float) -> float:
        """Arrival time of a message posted now."""
        self.messages += 1
        if src == dst:
            return now
        self.bytes += nbytes
        same = self.node_of[src] == self.node_of[dst]
        bw, lat = self.cost.link(same)
        key = (src, same)
        start = max(now, self.free.get(key, 0.0))
        done = start + nbytes / bw
        self.free[key] = done
        return done + lat


class Cores:
    """At most `n` ranks compute at once (n = 0: unlimited, one device per rank)."""

    def __init__(self, loop: EventLoop, n: int) -> None:
        self.loop, self.n, self.busy, self.wait = loop, n, 0, []

    def run(self, duration: float, fn, *args) -> None:
        if self.n <= 0:
            self.loop.at(self.loop.now + duration, fn, *args)
        elif self.busy < self.n:
            self.busy += 1
            self.loop.at(self.loop.now + duration, self._done, fn, args)
        else:
            self.wait.append((duration, fn, args))

    def _done(self, fn, args) -> None:
        self.busy -= 1
        if self.wait:
            d, f, a = self.wait.pop(0)
            self.busy += 1
            self.loop.at(self.loop.now + d, self._done, f, a)
        fn(*args)


def makespan(durations: list[float], cores: int) -> float:
    """Time for independent jobs on `cores` workers (0 = one each); longest first."""
    ds = [d for d in durations if d > 0]
    if not ds:
        return 0.0
    if cores <= 0 or cores >= len(ds):
        return max(ds)
    free = [0.0] * cores
    for d in sorted(ds, reverse=True):
        i = free.index(min(free))
        free[i] += d
    return max(free)


@dataclass
class Workload:
    arrival_s: np.ndarray
    prompt: np.ndarray
    output: np.ndarray


def make_workload(n: int, input_len, output_len, arrival: str, rate: float, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(input_len[0], input_len[1] + 1, size=n)
    output = rng.integers(output_len[0], output_len[1] + 1, size=n)
    if arrival == "poisson":
        arr = np.cumsum(rng.exponential(1.0 / rate, size=n))
    else:
        arr = np.zeros(n)
    return Workload(arr, prompt, output)


@dataclass
class SimParams:
    num_blocks: int
    num_experts: int
    top_k: int
    max_running: int
    max_batch_tokens: int
    max_expert_batch: int
    group_block: bool = True
    policy: str = "defrag"
    lookahead: int = 3
    decay: float = 0.8
    skew_rate: float = 0.5
    hot_per_block: bool = True
    seed: int = 0
    duration_s: float = 0.0     # 0: until every request finished
    warmup_s: float = 0.0
    kv_tokens: float = math.inf  # KV capacity per attention rank in tokens (reserved up front)
    warm_start: bool = False
    # AEP attention micro-waves (WaveGate), as SchedulerConfig.attention_waves /
    # attention_max_wait_ms; waves=1 with max_wait 0 disables the gate (run whatever landed).
    attention_waves: int = 2
    attention_max_wait_s: float = 1.0


class Stats:
    """Per-request token times; summaries over the measurement window."""

    def __init__(self, wl: Workload, p: SimParams, num_gpus: int) -> None:
        self.wl, self.p = wl, p
        n = len(wl.prompt)
        self.generated = np.zeros(n, dtype=np.int64)
        self.first = np.full(n, np.nan)
        self.last = np.full(n, np.nan)
        self.done_at = np.full(n, np.nan)
        self.itl: list[tuple[float, float]] = []   # (emit time, gap)
        self.emits: list[float] = []
        self.preset = np.zeros(n, dtype=np.int64)
        self.busy = np.zeros(num_gpus)
        self.expert_rows = np.zeros((p.num_blocks, p.num_experts), dtype=np.int64)
        self.expert_batches = 0
        self.attn_batches = 0
        self.attn_batch_tokens = 0
        self.expert_batch_rows = 0
        self.end = 0.0

    def emit(self, req: int, now: float) -> bool:
        """One sampled token of `req`; True when the request is finished."""
        g = self.generated[req] = self.generated[req] + 1
        if g == 1:
            self.first[req] = now
        else:
            self.itl.append((now, now - self.last[req]))
        self.last[req] = now
        self.emits.append(now)
        if g >= self.wl.output[req]:
            self.done_at[req] = now
            return True
        return False

    def warm(self, req: int, rng: np.random.Generator) -> int:
        """Warm start: the request has already produced a uniform share of its output at t=0.

        Returns the tokens already generated (its KV holds prompt + those)."""
        g = int(rng.integers(0, self.wl.output[req]))
        self.generated[req] = self.preset[req] = g
        if g:
            self.first[req] = self.last[req] = 0.0
        return g

    def expert_batch(self, block: int, expert: int, rows: int) -> None:
        self.expert_rows[block, expert] += rows
        self.expert_batches += 1
        self.expert_batch_rows += rows

    def summary(self) -> dict:
        end = self.end
        w0 = self.p.warmup_s if self.p.duration_s else 0.0
        span = max(end - w0, 1e-12)
        emits = np.asarray(self.emits)
        tokens = int(np.count_nonzero(emits >= w0)) if emits.size else 0
        itl = np.asarray([g for t, g in self.itl if t >= w0]) if self.itl else np.zeros(0)
        first = self.first - self.wl.arrival_s
        ttft = first[(~np.isnan(first)) & (self.first >= w0)]
        pct = lambda a, q: float(np.percentile(a, q) * 1e3) if a.size else float("nan")  # noqa: E731
        return {
            "tokens_per_s": tokens / span,
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99),
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "mean_expert_batch": self.expert_batch_rows / max(self.expert_batches, 1),
            "mean_attention_batch": self.attn_batch_tokens / max(self.attn_batches, 1),
            "idle_fraction": float(1.0 - np.mean(np.minimum(self.busy / max(end, 1e-12), 1.0))),
            "simulated_seconds": end,
            "requests_done": int(np.count_nonzero(~np.isnan(self.done_at))),
            "output_tokens": int(self.generated.sum() - self.preset.sum()),
        }


class Gateway:
    """Admits requests in arrival order onto the attention rank with the fewest running."""

    def __init__(self, wl: Workload, p: SimParams, num_ranks: int) -> None:
        self.wl, self.p = wl, p
        self.next = 0
        self.running = [0] * num_ranks
        self.kv_used = [0.0] * num_ranks

    def admit(self, now: float, budget_tokens: list[int] | None = None) -> list[tuple[int, int]]:
        """(request, rank) pairs placed now."""
        placed = []
        wl, p = self.wl, self.p
        while self.next < len(wl.prompt) and wl.arrival_s[self.next] <= now:
            req = self.next
            need = float(wl.prompt[req] + wl.output[req])
            rank = min(range(len(self.running)), key=lambda r: (self.running[r], self.kv_used[r]))
            if self.running[rank] >= p.max_running or self.kv_used[rank] + need > p.kv_tokens:
                break
            if budget_tokens is not None:
                if budget_tokens[rank] < wl.prompt[req] and budget_tokens[rank] < p.max_batch_tokens:
                    break
                budget_tokens[rank] -= int(wl.prompt[req])
            self.running[rank] += 1
            self.kv_used[rank] += need
            self.next += 1
            placed.append((req, rank))
        return placed

    def finish(self, req: int, rank: int) -> None:
        self.running[rank] -= 1
        self.kv_used[rank] -= float(self.wl.prompt[req] + self.wl.output[req])

    def next_arrival(self) -> float | None:
        return float(self.wl.arrival_s[self.next]) if self.next < len(self.wl.prompt) else None


# ---------------------------------------------------------------------------------------------
# AEP
# ---------------------------------------------------------------------------------------------
class _AepAttn:
    """An AEP attention rank: the real rank's loop (AttentionRank.run_aep) as events."""

    def __init__(self, sim: "AepSim", idx: int, gpu: int) -> None:
        p = sim.p
        self.sim, self.idx, self.gpu = sim, idx, gpu
        self.W = max(1, p.attention_waves)
        self.q = MuQueues(p.num_blocks, self.W)          # slot = wave
        self.gate = WaveGate(p.num_blocks, self.W, p.max_batch_tokens, p.attention_max_wait_s)
        self.sched = make_scheduler(p.policy, p.lookahead, p.decay)
        self.busy = False
        self.pending: dict[int, int] = {}
        self.wave: dict[int, int] = {}                   # running request -> its wave
        self.wake_at = math.inf                          # pending max_wait wake-up

    def admit(self, req: int, n: int) -> None:
        w = self.gate.pick_wave(list(self.wave.values()))
        self.wave[req] = w
        self.push(0, w, req, n)

    def push(self, b: int, w: int, req: int, n: int) -> None:
        self.gate.queued(b, w, self.q.lengths[b, w] == 0, self.sim.loop.now)
        self.q.push(b, w, (req, n), n)

    def kick(self) -> None:
        if self.busy:
            return
        sim = self.sim
        now = sim.loop.now
        pick = self.sched.pick(self.gate.ready(self.q.lengths, now))
        if pick is None:
            self._arm_wake(now)
            return
        b, w = pick
        segs = self.q.pop(b, w, sim.p.max_batch_tokens)
        toks = sum(s[1] for s in segs)
        ctx = 0.0
        for req, n in segs:
            pos = sim.ctx[req]
            ctx += n * pos + n * (n + 1) / 2.0
        t = sim.cost.attention_time(toks, ctx, lm_rows=len(segs) if b == 0 else 0)
        sim.stats.attn_batches += 1
        sim.stats.attn_batch_tokens += toks
        self.busy = True
        sim.stats.busy[self.gpu] += t
        sim.cores.run(t, self.done, b, w, segs)

    def _arm_wake(self, now: float) -> None:
        """Gated queues hold tokens: wake when the oldest one's max_wait runs out (the real
        rank notices on its next poll)."""
        held = self.q.lengths > 0
        if not held.any():
            return
        t = float(self.gate.since_BW[held].min()) + self.gate.max_wait_s
        t = max(t, now) + 1e-9
        if t < self.wake_at:
            self.wake_at = t
            self.sim.loop.at(t, self._wake, t)

    def _wake(self, t: float) -> None:
        if t == self.wake_at:
            self.wake_at = math.inf
        self.kick()

    def done(self, b: int, w: int, segs: list) -> None:
        sim = self.sim
        self.busy = False
        now = sim.loop.now
        self.gate.dispatched(b, w, len(segs))
        counts = sim.router.counts(b, [n for _, n in segs])   # [S, E]
        per_rank = sim.experts_per_rank
        row_bytes = sim.cost.row_bytes()
        for s, (req, n) in enumerate(segs):
            self.pending[req] = n * sim.p.top_k
        for r, ex in enumerate(sim.experts):
            lo = r * per_rank
            sub = counts[:, lo:lo + per_rank]
            nz_s, nz_e = np.nonzero(sub)
            if nz_s.size == 0:
                continue
            items = [(int(e), segs[s][0], int(sub[s, e])) for s, e in zip(nz_s.tolist(), nz_e.tolist())]
            rows = int(sub.sum())
            arrive = sim.net.send(now, self.gpu, ex.gpu, rows * row_bytes)
            sim.loop.at(arrive, ex.receive, b, self.idx, items)
        self.kick()

    def receive(self, b: int, items: list) -> None:
        sim = self.sim
        now = sim.loop.now
        nb = sim.p.num_blocks
        done = []
        for req, cnt in items:
            left = self.pending[req] - cnt
            if left:
                self.pending[req] = left
                continue
            del self.pending[req]
            done.append(req)
        if not done:
            return
        self.gate.returned(b, [self.wave[req] for req in done])
        if b + 1 < nb:
            for req in done:
                self.push(b + 1, self.wave[req], req, int(sim.seg_tokens[req]))
            self.kick()
            return
        # Last block: sample; the next decode token re-enters block 0.
        self.gate.sampled([self.wave[req] for req in done])
        finished = False
        for req in done:
            sim.ctx[req] += sim.seg_tokens[req]
            if sim.stats.emit(req, now):
                del self.wave[req]
                sim.gateway.finish(req, self.idx)
                finished = True
            else:
                sim.seg_tokens[req] = 1
                self.push(0, self.wave[req], req, 1)
        if finished:
            sim.admit()
        self.kick()


class _AepExpert:
    def __init__(self, sim: "AepSim", idx: int, gpu: int) -> None:
        p = sim.p
        self.sim, self.idx, self.gpu = sim, idx, gpu
        self.base = idx * sim.experts_per_rank
        self.q = MuQueues(p.num_blocks, sim.experts_per_rank)
        self.sched = make_scheduler(p.policy, p.lookahead, p.decay)
        self.busy = False

    def receive(self, b: int, src: int, items: list) -> None:
        q = self.q
        for e, req, cnt in items:
            q.push(b, e, (src, req, cnt), cnt)
        self.kick()

    def kick(self) -> None:
        if self.busy:
            return
        Q = self.q.lengths
        pick = self.sched.pick(Q)
        if pick is None:
            return
        b, e0 = pick
        slots = [e0]
        if self.sim.p.group_block:
            slots += [e for e in pick_block_group(Q, b) if e != e0]
        budget = self.sim.p.max_expert_batch
        taken: list = []
        counts = []
        stats = self.sim.stats
        for e in slots:
            if budget < 1:
                break
            items = self.q.pop(b, e, budget)
            c = sum(it[2] for it in items)
            if c == 0:
                continue
            budget -= c
            counts.append(c)
            taken.extend(items)
            stats.expert_batch(b, self.base + e, c)
        t = self.sim.cost.expert_time(counts)
        self.busy = True
        stats.busy[self.gpu] += t
        self.sim.cores.run(t, self.done, b, taken)

    def done(self, b: int, taken: list) -> None:
        sim = self.sim
        self.busy = False
        now = sim.loop.now
        by_src: dict[int, list] = {}
        for src, req, cnt in taken:
            by_src.setdefault(src, []).append((req, cnt))
        row_bytes = sim.cost.row_bytes()
        for src, items in by_src.items():
            a = sim.attn[src]
            rows = sum(c for _, c in items)
            arrive = sim.net.send(now, self.gpu, a.gpu, rows * row_bytes)
            sim.loop.at(arrive, a.receive, b, items)
        self.kick()


class AepSim:
    def __init__(self, cost: CostModel, wl: Workload, p: SimParams, attention_gpus: int,
                 expert_gpus: int, cores: int = 0, gpus_per_node: int = 8) -> None:
        if p.num_experts % expert_gpus:
            raise ValueError(f"{p.num_experts} experts do not split evenly over {expert_gpus} expert ranks")
        self.cost, self.wl, self.p = cost, wl, p
        self.loop = EventLoop()
        G = attention_gpus + expert_gpus
        self.experts_per_rank = p.num_experts // expert_gpus
        # Spread both kinds evenly over nodes: GPU ids 0..A-1 attention, A..G-1 experts.
        nodes = max(1, math.ceil(G / gpus_per_node))
        node_of = [i * nodes // attention_gpus for i in range(attention_gpus)] + \
                  [i * nodes // expert_gpus for i in range(expert_gpus)]
        self.net = Net(cost, node_of)
        self.cores = Cores(self.loop, cores)
        self.router = Router(p.num_experts, p.top_k, p.skew_rate, p.num_blocks, p.hot_per_block, p.seed)
        self.stats = Stats(wl, p, G)
        self.gateway = Gateway(wl, p, attention_gpus)
        self.attn = [_AepAttn(self, i, i) for i in range(attention_gpus)]
        self.experts = [_AepExpert(self, i, attention_gpus + i) for i in range(expert_gpus)]
        n = len(wl.prompt)
        self.ctx = np.zeros(n, dtype=np.int64)          # tokens already in the KV cache
        self.seg_tokens = wl.prompt.astype(np.int64).copy()  # tokens of the request's segment in flight

    def admit(self) -> None:
        warm = self.p.warm_start and self.loop.now == 0.0
        for req, rank in self.gateway.admit(self.loop.now):
            n = int(self.wl.prompt[req])
            if warm:
                g = self.stats.warm(req, self._warm_rng)
                if g:
                    self.ctx[req] = n + g - 1
                    n = self.seg_tokens[req] = 1
            a = self.attn[rank]
            a.admit(req, n)
            a.kick()
        nxt = self.gateway.next_arrival()
        if nxt is not None and nxt > self.loop.now and nxt not in self._scheduled:
            self._scheduled.add(nxt)
            self.loop.at(nxt, self.admit)

    def run(self) -> Stats:
        self._scheduled: set = set()
        self._warm_rng = np.random.default_rng(self.p.seed + 7)
        self.loop.at(0.0, self.admit)
        self.loop.run(self.p.duration_s or None)
        self.stats.end = self.loop.now
        if self.stats.emits and not np.isnan(self.stats.done_at).any():
            # Every request finished: stale max_wait wake-ups left in the heap are not work.
            self.stats.end = min(self.stats.end, self.stats.emits[-1])
        return self.stats


def simulate_aep(cost, wl, p, attention_gpus, expert_gpus, cores=0, gpus_per_node=8) -> Stats:
    return AepSim(cost, wl, p, attention_gpus, expert_gpus, cores, gpus_per_node).run()


# ---------------------------------------------------------------------------------------------
# Lockstep
# ---------------------------------------------------------------------------------------------
class LockstepSim:
    """DP attention + EP experts with a barrier per block.

    colocated: G GPUs each run attention (a DP replica) and E/G experts (SGLang/vLLM EP); with
    G > E each expert is replicated G/E times and its rows split evenly over the replicas.
    split: attention_gpus attention ranks and expert_gpus expert ranks (this repo's lockstep).
    Per block: max_r attention + dispatch all-to-all + max_r experts + combine all-to-all.
    """

    def __init__(self, cost: CostModel, wl: Workload, p: SimParams, attention_gpus: int,
                 expert_gpus: int, colocated: bool, cores: int = 0, gpus_per_node: int = 8) -> None:
        self.cost, self.wl, self.p, self.cores = cost, wl, p, cores
        self.loop = EventLoop()
        self.A, self.X = attention_gpus, expert_gpus
        self.colocated = colocated
        E = p.num_experts
        if colocated:
            if attention_gpus != expert_gpus:
                raise ValueError("colocated lockstep uses every GPU for both attention and experts")
            G = attention_gpus
            self.attn_gpu = list(range(G))
            self.exp_gpu = list(range(G))
        else:
            G = attention_gpus + expert_gpus
            self.attn_gpu = list(range(attention_gpus))
            self.exp_gpu = list(range(attention_gpus, G))
        self.G = G
        # owner[e] = list of expert-rank indices holding expert e (replicas share its rows).
        if E >= expert_gpus:
            if E % expert_gpus:
                raise ValueError(f"{E} experts do not split evenly over {expert_gpus} expert ranks")
            per = E // expert_gpus
            self.owners = [[e // per] for e in range(E)]
        else:
            if expert_gpus % E:
                raise ValueError(f"{expert_gpus} expert ranks do not replicate {E} experts evenly")
            rep = expert_gpus // E
            self.owners = [[e * rep + i for i in range(rep)] for e in range(E)]
        nodes = max(1, math.ceil(G / gpus_per_node))
        if colocated:
            self.node_of = [g * nodes // G for g in range(G)]
        else:
            self.node_of = [i * nodes // attention_gpus for i in range(attention_gpus)] + \
                           [i * nodes // expert_gpus for i in range(expert_gpus)]
        self.router = Router(E, p.top_k, p.skew_rate, p.num_blocks, p.hot_per_block, p.seed)
        self.stats = Stats(wl, p, G)
        self.gateway = Gateway(wl, p, attention_gpus)
        n = len(wl.prompt)
        self.ctx = np.zeros(n, dtype=np.int64)
        self.batch: list[list[int]] = [[] for _ in range(attention_gpus)]   # running per DP rank
        self.new_tokens = np.zeros(n, dtype=np.int64)
        self.rank_of = np.zeros(n, dtype=np.int64)
        self.steps = 0
        self._warm_rng = np.random.default_rng(p.seed + 7)
        self.block_times: list[float] = []

    def _alltoall(self, bytes_AX: np.ndarray, forward: bool) -> float:
        """Time of one all-to-all: each GPU's sends (and receives) serialize on its links."""
        send: dict = {}
        recv: dict = {}
        lat = 0.0
        for a in range(self.A):
            for x in range(self.X):
                nb = bytes_AX[a, x]
                if nb <= 0:
                    continue
                src, dst = (self.attn_gpu[a], self.exp_gpu[x]) if forward else (self.exp_gpu[x], self.attn_gpu[a])
                if src == dst:
                    continue
                same = self.node_of[src] == self.node_of[dst]
                bw, l = self.cost.link(same)
                lat = max(lat, l)
                send[(src, same)] = send.get((src, same), 0.0) + nb / bw
                recv[(dst, same)] = recv.get((dst, same), 0.0) + nb / bw
        if not send:
            return 0.0
        return lat + max(max(send.values()), max(recv.values()))

    def iteration(self) -> None:
        """Start one iteration (all blocks) at the current time."""
        now = self.loop.now
        p = self.p
        warm = p.warm_start and now == 0.0 and self.steps == 0
        budget = None if warm else [p.max_batch_tokens - len(b) for b in self.batch]
        for req, rank in self.gateway.admit(now, budget):
            self.batch[rank].append(req)
            self.new_tokens[req] = self.wl.prompt[req]
            self.rank_of[req] = rank
            if warm:
                g = self.stats.warm(req, self._warm_rng)
                if g:
                    self.ctx[req] = self.wl.prompt[req] + g - 1
                    self.new_tokens[req] = 1
        if not any(self.batch):
            nxt = self.gateway.next_arrival()
            if nxt is not None:
                self.loop.at(max(nxt, now), self.iteration)
            return
        self.steps += 1
        self.loop.at(now, self.block, 0)

    def block(self, b: int) -> None:
        p, cost, st = self.p, self.cost, self.stats
        E = p.num_experts
        t_attn = []
        rows_AE = np.zeros((self.A, E), dtype=np.int64)
        for a, reqs in enumerate(self.batch):
            if not reqs:
                t_attn.append(0.0)
                continue
            toks = [int(self.new_tokens[r]) for r in reqs]
            ctx = sum(n * int(self.ctx[r]) + n * (n + 1) / 2.0 for r, n in zip(reqs, toks))
            t = cost.attention_time(sum(toks), ctx, lm_rows=len(reqs) if b == 0 else 0)
            t_attn.append(t)
            st.attn_batches += 1
            st.attn_batch_tokens += sum(toks)
            st.busy[self.attn_gpu[a]] += t
            rows_AE[a] = self.router.counts(b, [sum(toks)])[0]
        # rows per (attention rank, expert rank, local slot)
        rows_AX = np.zeros((self.A, self.X), dtype=np.float64)
        per_rank_counts: list[list[int]] = [[] for _ in range(self.X)]
        for e in range(E):
            owners = self.owners[e]
            tot_e = int(rows_AE[:, e].sum())
            st.expert_rows[b, e] += tot_e
            for i, x in enumerate(owners):
                share = tot_e // len(owners) + (1 if i < tot_e % len(owners) else 0)
                per_rank_counts[x].append(share)
                if share:
                    st.expert_batches += 1
                    st.expert_batch_rows += share
            for a in range(self.A):
                n = rows_AE[a, e]
                for i, x in enumerate(owners):
                    rows_AX[a, x] += n / len(owners)
        t_exp = []
        for x in range(self.X):
            t = cost.expert_time(per_rank_counts[x])
            t_exp.append(t)
            st.busy[self.exp_gpu[x]] += t
        by = rows_AX * cost.row_bytes()
        dispatch = self._alltoall(by, True)
        combine = self._alltoall(by, False)
        step = makespan(t_attn, self.cores) + dispatch + makespan(t_exp, self.cores) + combine
        self.block_times.append(step)
        nxt = b + 1
        if nxt < p.num_blocks:
            self.loop.at(self.loop.now + step, self.block, nxt)
        else:
            self.loop.at(self.loop.now + step, self.end_iteration)

    def end_iteration(self) -> None:
        now = self.loop.now
        for a, reqs in enumerate(self.batch):
            keep = []
            for r in reqs:
                self.ctx[r] += self.new_tokens[r]
                self.new_tokens[r] = 1
                if self.stats.emit(r, now):
                    self.gateway.finish(r, a)
                else:
                    keep.append(r)
            self.batch[a] = keep
        self.iteration()

    def run(self) -> Stats:
        self.loop.at(0.0, self.iteration)
        self.loop.run(self.p.duration_s or None)
        self.stats.end = self.loop.now
        return self.stats


def simulate_lockstep(cost, wl, p, attention_gpus, expert_gpus, colocated=True, cores=0,
                      gpus_per_node=8) -> Stats:
    return LockstepSim(cost, wl, p, attention_gpus, expert_gpus, colocated, cores, gpus_per_node).run()
