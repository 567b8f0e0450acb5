"""Lockstep expert parallelism on a simulated cluster: DP attention + EP experts with a barrier
per block, the baseline every claim is measured against.

colocated: G GPUs each run attention (a DP replica) and expert copies (SGLang/vLLM EP);
split: attention_gpus attention ranks and expert_gpus expert ranks (this repo's lockstep mode).
Experts sit where the placement puts them (greedy balancing or EPLB-style replicas, the same
`Placement` AEP gets); a replicated expert's rows are shared by `sched.replicas`.
Per block: max over ranks of attention + dispatch all-to-all + max over ranks of experts +
combine all-to-all; every rank's time carries its own noise, so the barrier pays the slowest.
"""
from __future__ import annotations

import numpy as np

from amoe_serve.placement.layout import Placement
from amoe_serve.sched.replicas import replica_shares_E

from .cost import CostModel
from .events import EventLoop, makespan, node_layout
from .noise import Noise, NoiseConfig
from .params import SimParams
from .stats import SimGateway, Stats
from .workload import Router, Workload, popularity


class LockstepSim:
    def __init__(self, cost: CostModel, wl: Workload, p: SimParams, attention_gpus: int,
                 expert_gpus: int, colocated: bool, cores: int = 0, gpus_per_node: int = 8,
                 placement: Placement | None = None, noise: NoiseConfig | None = None) -> None:
        self.cost, self.wl, self.p, self.cores = cost, wl, p, cores
        self.loop = EventLoop()
        self.A, self.X = attention_gpus, expert_gpus
        self.colocated = colocated
        E = p.num_experts
        if colocated:
            if attention_gpus != expert_gpus:
                raise ValueError("colocated lockstep uses every GPU for both attention and experts")
            G = attention_gpus
            self.attn_gpu = np.arange(G)
            self.exp_gpu = np.arange(G)
            node_of = np.asarray([g * max(1, -(-G // gpus_per_node)) // G for g in range(G)])
        else:
            G = attention_gpus + expert_gpus
            self.attn_gpu = np.arange(attention_gpus)
            self.exp_gpu = np.arange(attention_gpus, G)
            node_of = np.asarray(node_layout(attention_gpus, expert_gpus, gpus_per_node))
        self.G = G
        self.p_BE = popularity(E, p.skew_rate, p.num_blocks, p.hot_per_block, p.seed)
        if placement is None:
            if E < expert_gpus:
                raise ValueError(f"{expert_gpus} expert ranks but {E} experts: give a placement")
            placement = Placement.contiguous(p.num_blocks, E, expert_gpus)
        self.placement = placement
        self.n_BE, self.ranks_BEM = placement.replica_tables()
        self.M = self.ranks_BEM.shape[2]
        # Link cost per byte between attention rank a and expert rank x (0 on the same GPU).
        an, xn = node_of[self.attn_gpu], node_of[self.exp_gpu]
        same_AX = an[:, None] == xn[None, :]
        bw_i, lat_i = cost.link(True)
        bw_o, lat_o = cost.link(False)
        self.s_per_byte_AX = np.where(same_AX, 1.0 / bw_i, 1.0 / bw_o)
        self.self_AX = self.attn_gpu[:, None] == self.exp_gpu[None, :]
        self.s_per_byte_AX[self.self_AX] = 0.0
        self.lat_AX = np.where(same_AX, lat_i, lat_o)
        # Messages per rank per exchange: every attention rank sends to every expert rank.
        self.peers = expert_gpus - 1 if colocated else expert_gpus
        self.noise = Noise(noise or NoiseConfig(cv=0.0), G)
        self.router = Router(self.p_BE, p.top_k, p.seed, 0)
        self.stats = Stats(wl, p, G)
        self.gateway = SimGateway(wl, p, attention_gpus)
        n = len(wl.prompt)
        self.ctx = np.zeros(n, dtype=np.int64)
        self.batch: list[list[int]] = [[] for _ in range(attention_gpus)]   # running per DP rank
        self.new_tokens = np.zeros(n, dtype=np.int64)
        self.steps = 0
        self._warm_rng = np.random.default_rng(p.seed + 7)
        self.block_times: list[float] = []

    def _alltoall(self, bytes_AX: np.ndarray) -> float:
        """One all-to-all: each GPU's sends (and receives) serialize on its links."""
        cross_AX = (bytes_AX > 0) & ~self.self_AX
        if not cross_AX.any():
            return 0.0
        t_AX = bytes_AX * self.s_per_byte_AX
        lat = float(self.lat_AX[cross_AX].max())
        return lat + max(float(t_AX.sum(axis=1).max()), float(t_AX.sum(axis=0).max()))

    def iteration(self) -> None:
        """Start one iteration (all blocks) at the current time."""
        now = self.loop.now
        p = self.p
        warm = p.warm_start and now == 0.0 and self.steps == 0
        budget = None if warm else [p.max_batch_tokens - len(b) for b in self.batch]
        for req, rank in self.gateway.admit(now, budget):
            self.batch[rank].append(req)
            self.new_tokens[req] = self.wl.prompt[req]
            self.stats.admitted[req] = now
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
        # The batch is fixed for the iteration: attention cost per rank is the same every block.
        cost = self.cost
        self.tokens_A = np.zeros(self.A, dtype=np.int64)
        self.t_attn_A = np.zeros(self.A)
        msg = self.peers * (cost.t.msg_send_s + cost.t.msg_recv_s)
        for a, reqs in enumerate(self.batch):
            if not reqs:
                continue
            toks = self.new_tokens[reqs]
            c = self.ctx[reqs]
            ctx = float((toks * c + toks * (toks + 1) / 2.0).sum())
            self.tokens_A[a] = int(toks.sum())
            self.t_attn_A[a] = cost.attention_time(int(toks.sum()), ctx) + msg
        self.loop.at(now, self.block, 0)

    def block(self, b: int) -> None:
        p, cost, st = self.p, self.cost, self.stats
        active = self.tokens_A > 0
        t_attn = self.noise.scale_G(self.attn_gpu, self.t_attn_A)
        st.attn_batches += int(active.sum())
        st.attn_batch_tokens += int(self.tokens_A.sum())
        np.add.at(st.busy, self.attn_gpu, t_attn)
        rows_AE = self.router.counts_A(b, self.tokens_A)
        count_E = rows_AE.sum(axis=0)
        st.expert_rows[b] += count_E
        share_EM = replica_shares_E(count_E, self.n_BE[b], self.M)          # rows per replica
        # Per expert rank, rows of each expert copy it holds.
        per_rank: list[list[int]] = [[] for _ in range(self.X)]
        frac_EX = np.zeros((p.num_experts, self.X))
        for e in range(p.num_experts):
            c = int(count_E[e])
            for i in range(int(self.n_BE[b, e])):
                x = int(self.ranks_BEM[b, e, i])
                r = int(share_EM[e, i])
                per_rank[x].append(r)
                if r:
                    st.expert_batches += 1
                    st.expert_batch_rows += r
                    frac_EX[e, x] += r / c
        msg = (self.A - (1 if self.colocated else 0)) * (cost.t.msg_send_s + cost.t.msg_recv_s)
        t_exp = np.array([cost.expert_time(c) + msg if any(c) else 0.0 for c in per_rank])
        t_exp = self.noise.scale_G(self.exp_gpu, t_exp)
        np.add.at(st.busy, self.exp_gpu, t_exp)
        bytes_AX = (rows_AE @ frac_EX) * cost.row_bytes()
        a2a = self._alltoall(bytes_AX)
        step = makespan(t_attn.tolist(), self.cores) + a2a + makespan(t_exp.tolist(), self.cores) + a2a
        if b == p.num_blocks - 1:   # the sampler after the last block, on every DP rank
            lm = [cost.lm_head_time(len(r)) if r else 0.0 for r in self.batch]
            step += max(lm)
            np.add.at(st.busy, self.attn_gpu, lm)
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
                      gpus_per_node=8, **kw) -> Stats:
    return LockstepSim(cost, wl, p, attention_gpus, expert_gpus, colocated, cores, gpus_per_node, **kw).run()
