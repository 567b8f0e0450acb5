"""AEP on a simulated cluster: attention ranks (DP, sticky requests) and expert ranks (EP) as
event-driven poll loops that call the real ranks' decision code.

Each rank mirrors its loop in `engine/`: messages that arrive while it computes wait in an inbox
and are handled at its next poll; a poll handles them, asks `AttentionPlan.sample_batch` whether
a wave is sampled (LM head), then `AttentionPlan.next_batch` / `next_expert_step` what runs next.
Segments are the real ones: a batch of requests; the segments popped for one attention step are
merged into one, which waits for all of its k rows per token (the token pool) before it moves to
the next block. Rows of a replicated expert are shared as `sched.replicas.replica_shares` (the
real dispatch's contiguous cut); local slots are `Placement.pairs_of` order, as `ExpertCore`.
No barriers anywhere. Only the times come from the cost model.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from amoe_serve.placement.layout import Placement
from amoe_serve.sched.attention_plan import AttentionPlan
from amoe_serve.sched.expert_plan import ExpertGate, next_expert_step
from amoe_serve.sched.policies import make_scheduler
from amoe_serve.sched.queues import MuQueues
from amoe_serve.sched.replicas import replica_shares

from .cost import CostModel
from .events import Cores, EventLoop, Net, node_layout
from .noise import Noise, NoiseConfig
from .params import SimParams
from .stats import SimGateway, Stats
from .workload import Router, Workload, popularity


class SimSegment:
    __slots__ = ("seg_id", "reqs", "n", "wave")

    def __init__(self, seg_id: int, reqs: list[int], n: list[int], wave: int) -> None:
        self.seg_id, self.reqs, self.n, self.wave = seg_id, reqs, n, wave

    @property
    def tokens(self) -> int:
        return sum(self.n)


class _AttnRank:
    def __init__(self, sim: "AepSim", idx: int, gpu: int, router) -> None:
        p = sim.p
        self.sim, self.idx, self.gpu, self.router = sim, idx, gpu, router
        self.plan = AttentionPlan(p.num_blocks, max(1, p.attention_waves), p.max_batch_tokens,
                                  p.attention_max_wait_s, make_scheduler(p.policy, p.lookahead, p.decay),
                                  p.min_wave_requests)
        self.inbox: list = []
        self.busy = False
        self.pool: dict[int, list] = {}          # seg_id -> [segment, rows still out]
        self.wave_of: dict[int, int] = {}        # running request -> its wave
        self.recv_msgs = 0                       # messages handled since the last step (host cost)
        self.wake_at = math.inf

    # ---- messages ---------------------------------------------------------------------------
    def post(self, msg: tuple) -> None:
        self.inbox.append(msg)
        if not self.busy:
            self.poll()

    def _handle(self, now: float) -> None:
        sim, plan = self.sim, self.plan
        for kind, *rest in self.inbox:
            if kind == "req":
                req, n = rest
                w = plan.wave_for(list(self.wave_of.values()))
                self.wave_of[req] = w
                plan.push(0, w, SimSegment(next(sim.seg_ids), [req], [n], w), n, now)
            else:  # combine: (block, {seg_id: rows})
                b, rows = rest
                self.recv_msgs += 1
                done = []
                for sid in sorted(rows):             # the real deliver: torch.unique order
                    ent = self.pool[sid]
                    ent[1] -= rows[sid]
                    if ent[1] == 0:
                        del self.pool[sid]
                        done.append(ent[0])
                plan.returned(b, [(s, s.wave, s.tokens) for s in done], now)
        self.inbox.clear()

    # ---- the poll loop ----------------------------------------------------------------------
    def poll(self) -> None:
        sim = self.sim
        now = sim.loop.now
        self.busy = True
        self._handle(now)
        segs = self.plan.sample_batch(now)
        if segs:
            t = sim.cost.lm_head_time(sum(len(s.reqs) for s in segs))
            self._run(t, self._sampled, segs)
            return
        self._pick()

    def _run(self, t: float, fn, *args) -> None:
        sim = self.sim
        t = sim.noise.scale(self.gpu, t + self.recv_msgs * sim.cost.t.msg_recv_s)
        self.recv_msgs = 0
        sim.stats.busy[self.gpu] += t
        sim.cores.run(t, fn, *args)

    def _sampled(self, segs: list[SimSegment]) -> None:
        sim = self.sim
        now = sim.loop.now
        nxt: dict[int, list[int]] = {}
        finished = False
        for s in segs:
            for req, n in zip(s.reqs, s.n):
                sim.ctx[req] += n
                if sim.stats.emit(req, now):
                    del self.wave_of[req]
                    sim.gateway.finish(req, self.idx)
                    finished = True
                else:
                    nxt.setdefault(self.wave_of[req], []).append(req)
        for w in sorted(nxt):                        # one decode segment per wave
            reqs = nxt[w]
            self.plan.push(0, w, SimSegment(next(sim.seg_ids), reqs, [1] * len(reqs), w), len(reqs), now)
        if finished:
            sim.admit()
        self._pick()

    def _pick(self) -> None:
        sim = self.sim
        now = sim.loop.now
        batch = self.plan.next_batch(now)
        if batch is None:
            self.busy = False
            if self.inbox:
                self.poll()
            else:
                self._arm_wake(now)
            return
        b, items = batch.block, batch.items
        if sim.trace is not None:
            sim.trace.append((1 + self.idx, b, batch.wave, batch.tokens))
        seg = items[0] if len(items) == 1 else SimSegment(
            next(sim.seg_ids), [r for s in items for r in s.reqs], [n for s in items for n in s.n], batch.wave)
        ctx = 0.0
        for req, n in zip(seg.reqs, seg.n):
            ctx += n * sim.ctx[req] + n * (n + 1) / 2.0
        counts_E = self.router.counts(b, batch.tokens)
        sends = sim.split_rows(b, counts_E)
        t = sim.cost.attention_time(batch.tokens, ctx) + len(sends) * sim.cost.t.msg_send_s
        sim.stats.attn_batches += 1
        sim.stats.attn_batch_tokens += batch.tokens
        self._run(t, self._attended, b, seg, sends)

    def _attended(self, b: int, seg: SimSegment, sends: dict) -> None:
        sim = self.sim
        now = sim.loop.now
        self.pool[seg.seg_id] = [seg, seg.tokens * sim.p.top_k]
        row_bytes = sim.cost.row_bytes()
        for x, chunks in sends.items():               # one DISPATCH per expert rank with rows
            ex = sim.experts[x]
            rows = sum(c for _, c in chunks)
            arrive = sim.net.send(now, self.gpu, ex.gpu, rows * row_bytes)
            sim.loop.at(arrive, ex.post, (self.idx, b, seg.seg_id, chunks))
        self.poll()

    def _arm_wake(self, now: float) -> None:
        """Held queues: the real rank re-polls while it sleeps; wake when max_wait runs out."""
        t = self.plan.next_wake(now)
        if t is None or not math.isfinite(t):
            return
        t = max(t, now) + 1e-9
        if t < self.wake_at or self.wake_at <= now:
            self.wake_at = t
            self.sim.loop.at(t, self._wake, t)

    def _wake(self, t: float) -> None:
        if t == self.wake_at and not self.busy:
            self.wake_at = math.inf
            self.poll()


class _ExpertRank:
    def __init__(self, sim: "AepSim", idx: int, gpu: int, pairs: list[tuple[int, int]]) -> None:
        p = sim.p
        self.sim, self.idx, self.gpu = sim, idx, gpu
        self.slot_of: dict[tuple[int, int], int] = {}
        self.expert_of: list[list[int]] = [[] for _ in range(p.num_blocks)]
        for b, e in pairs:                           # ExpertCore's slot numbering
            self.slot_of[(b, e)] = len(self.expert_of[b])
            self.expert_of[b].append(e)
        self.queues = MuQueues(p.num_blocks, max(1, max(len(x) for x in self.expert_of)))
        self.sched = make_scheduler(p.policy, p.lookahead, p.decay)
        self.gate = ExpertGate(p.num_blocks, p.expert_min_rows, p.expert_max_wait_s)
        self.inbox: list = []
        self.busy = False
        self._wake_at = math.inf

    def post(self, msg: tuple) -> None:
        self.inbox.append(msg)
        if not self.busy:
            self.poll()

    def poll(self) -> None:
        sim = self.sim
        n_msgs = len(self.inbox)
        now = sim.loop.now
        for src, b, sid, chunks in self.inbox:
            for e, rows in chunks:
                self.queues.push(b, self.slot_of[(b, e)], (src, sid, rows), rows)
            self.gate.pushed(b, now)
        self.inbox.clear()
        step = next_expert_step(self.queues, self.sched, sim.p.max_expert_batch, sim.p.group_block, self.gate, now)
        if step is None:
            self.busy = False
            if self.gate.enabled and not self.queues.is_empty():  # held rows: come back when they may run
                t = self.gate.next_deadline()
                if t < self._wake_at:
                    self._wake_at = t
                    sim.loop.at(t, self._wake)
            return
        self.busy = True
        b = step.block
        st = sim.stats
        for s, rows in zip(step.slots, step.rows):
            st.expert_batch(b, self.expert_of[b][s], rows)
            if sim.trace is not None:
                sim.trace.append((1 + sim.A + self.idx, b, s, rows))
        by_src: dict[int, dict[int, int]] = {}
        for got in step.items:
            for src, sid, rows in got:
                d = by_src.setdefault(src, {})
                d[sid] = d.get(sid, 0) + rows
        c = sim.cost
        t = c.expert_time(step.rows) + n_msgs * c.t.msg_recv_s + len(by_src) * c.t.msg_send_s
        t = sim.noise.scale(self.gpu, t)
        st.busy[self.gpu] += t
        sim.cores.run(t, self._done, b, by_src, sum(step.rows))

    def _wake(self) -> None:
        self._wake_at = math.inf
        if not self.busy:
            self.poll()

    def _done(self, b: int, by_src: dict, rows: int) -> None:
        sim = self.sim
        now = sim.loop.now
        row_bytes = sim.cost.row_bytes()
        for src, d in by_src.items():                # one COMBINE per source attention rank
            a = sim.attn[src]
            arrive = sim.net.send(now, self.gpu, a.gpu, sum(d.values()) * row_bytes)
            sim.loop.at(arrive, a.post, ("combine", b, d))
        self.poll()


class AepSim:
    def __init__(self, cost: CostModel, wl: Workload, p: SimParams, attention_gpus: int,
                 expert_gpus: int, cores: int = 0, gpus_per_node: int = 8,
                 placement: Placement | None = None, routers: list | None = None,
                 noise: NoiseConfig | None = None, trace: list | None = None) -> None:
        self.cost, self.wl, self.p = cost, wl, p
        self.A, self.X = attention_gpus, expert_gpus
        self.loop = EventLoop()
        G = attention_gpus + expert_gpus
        self.net = Net(cost, node_layout(attention_gpus, expert_gpus, gpus_per_node))
        self.cores = Cores(self.loop, cores)
        self.noise = Noise(noise or NoiseConfig(cv=0.0), G)
        self.p_BE = popularity(p.num_experts, p.skew_rate, p.num_blocks, p.hot_per_block, p.seed)
        if placement is None:
            if p.num_experts < expert_gpus:
                raise ValueError(f"{expert_gpus} expert ranks but {p.num_experts} experts: give a placement")
            placement = Placement.contiguous(p.num_blocks, p.num_experts, expert_gpus)
        self.placement = placement
        self.n_BE, self.ranks_BEM = placement.replica_tables()
        self.trace = trace                            # executed (rank, block, slot, rows), if a list
        self.seg_ids = itertools.count()
        self.stats = Stats(wl, p, G)
        self.gateway = SimGateway(wl, p, attention_gpus)
        routers = routers or [Router(self.p_BE, p.top_k, p.seed, i) for i in range(attention_gpus)]
        self.attn = [_AttnRank(self, i, i, routers[i]) for i in range(attention_gpus)]
        self.experts = [_ExpertRank(self, i, attention_gpus + i, placement.pairs_of(i)) for i in range(expert_gpus)]
        n = len(wl.prompt)
        self.ctx = np.zeros(n, dtype=np.int64)         # tokens already in the KV cache

    def split_rows(self, b: int, counts_E: np.ndarray) -> dict[int, list[tuple[int, int]]]:
        """Expert rank -> [(expert, rows)] for one batch's rows per expert (ascending expert, as the
        real dispatch header lists them)."""
        out: dict[int, list[tuple[int, int]]] = {}
        n_E, ranks_EM = self.n_BE[b], self.ranks_BEM[b]
        for e in np.flatnonzero(counts_E).tolist():
            c, n = int(counts_E[e]), int(n_E[e])
            if n == 1:
                out.setdefault(int(ranks_EM[e, 0]), []).append((e, c))
                continue
            for i, share in enumerate(replica_shares(c, n)):
                if share:
                    out.setdefault(int(ranks_EM[e, i]), []).append((e, share))
        return dict(sorted(out.items()))

    def admit(self) -> None:
        now = self.loop.now
        warm = self.p.warm_start and now == 0.0
        got: set[int] = set()
        for req, rank in self.gateway.admit(now):
            n = int(self.wl.prompt[req])
            self.stats.admitted[req] = now
            if warm:
                g = self.stats.warm(req, self._warm_rng)
                if g:
                    self.ctx[req] = n + g - 1
                    n = 1
            self.attn[rank].inbox.append(("req", req, n))
            got.add(rank)
        for rank in sorted(got):  # the gateway's messages land together: one poll admits them all
            if not self.attn[rank].busy:
                self.attn[rank].poll()
        nxt = self.gateway.next_arrival()
        if nxt is not None and nxt > now and nxt not in self._scheduled:
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


def simulate_aep(cost, wl, p, attention_gpus, expert_gpus, cores=0, gpus_per_node=8, **kw) -> Stats:
    return AepSim(cost, wl, p, attention_gpus, expert_gpus, cores, gpus_per_node, **kw).run()
