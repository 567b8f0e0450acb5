"""Attention-rank state machine: requests, KV, attention + routing, top-k merge, sampling.

It performs no communication: `attend` returns the per-expert-rank dispatch payloads and
`deliver` takes expert outputs back, so the AEP loop, the lockstep loop and local mode all
drive the same code.

Legend: T tokens in a batch, D hidden, K top-k, R rows sent to experts (T*K), V vocab.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import torch

from amoe_serve.engine.skew import ExponentialSkew
from amoe_serve.kv.allocator import BlockAllocator
from amoe_serve.kv.cache import PagedKVCache
from amoe_serve.engine.placement import Placement
from amoe_serve.model import AttentionSide, AttnSegment
from amoe_serve.placement.trace import TraceRecorder
from amoe_serve.sampler import Sampler, SamplingParams, finish_reason, make_generator
from amoe_serve.sched.token_pool import TokenPool


@dataclass
class RequestState:
    id: str
    prompt: list[int]
    params: SamplingParams
    generator: Optional[torch.Generator]
    output: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    cancelled: bool = False
    wave: int = 0  # AEP micro-wave (the attention μ-queue slot) the request travels in


@dataclass
class Segment:
    """A request's new tokens travelling through the blocks (whole prompt, or one decode token)."""
    seg_id: int
    req: RequestState
    block: int
    x_TD: torch.Tensor
    start_pos: int
    route_TK: Optional[torch.Tensor] = None  # experts at the previous block (traces, affinity)

    @property
    def num_tokens(self) -> int:
        return self.x_TD.shape[0]


@dataclass
class TokenEvent:
    request_id: str
    token: Optional[int]
    finish_reason: Optional[str]
    error: Optional[str] = None

    def to_list(self) -> list:
        return [self.request_id, self.token, self.finish_reason, self.error]


@dataclass
class Dispatch:
    dst_index: int  # expert-rank index
    header: dict
    tensors: list[torch.Tensor]


class AttentionCore:
    def __init__(self, model: AttentionSide, placement: Placement,
                 kv: PagedKVCache, allocator: BlockAllocator, eos_token_ids: tuple[int, ...],
                 skew: Optional[ExponentialSkew] = None, trace_window_tokens: int = 512):
        self.model = model
        self.spec = model.spec
        self.skew = skew
        self.top_k = skew.top_k if skew is not None else model.spec.top_k
        self.device = kv.k_LNSGd.device
        self.owner_BE = torch.as_tensor(placement.owner_table(), dtype=torch.int64, device=self.device)
        self.expert_ranks = placement.expert_ranks
        # Replicated experts: their rows are split evenly (contiguous parts) across n_BE ranks.
        self.replicated = bool(placement.replicas_BE)
        n_BE, ranks_BEM = placement.replica_tables()
        self.n_BE = torch.as_tensor(n_BE, device=self.device)
        self.ranks_BEM = torch.as_tensor(ranks_BEM, device=self.device)
        self.trace = TraceRecorder(self.spec.num_blocks, self.spec.num_experts, self.top_k, trace_window_tokens)
        self.kv = kv
        self.allocator = allocator
        self.eos = tuple(eos_token_ids)
        self.sampler = Sampler()
        self.pool = TokenPool()
        self.requests: dict[str, RequestState] = {}
        self._seg_ids = itertools.count()
        self.segments: dict[int, Segment] = {}  # in the pool, waiting for expert outputs

    # ---- requests ---------------------------------------------------------------------
    def admit(self, rid: str, prompt: list[int], params: SamplingParams, wave: int = 0) -> Segment:
        """Reserve KV for the whole request up front (no preemption needed) and embed the prompt."""
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already running")
        self.allocator.allocate(rid, len(prompt) + params.max_tokens)
        req = RequestState(rid, list(prompt), params, make_generator(params.seed), wave=wave)
        self.requests[rid] = req
        x_TD = self.model.embed(torch.tensor(prompt, dtype=torch.long))
        return Segment(next(self._seg_ids), req, 0, x_TD, 0)

    def cancel(self, rid: str) -> None:
        req = self.requests.get(rid)
        if req is not None:
            req.cancelled = True  # its in-flight segment is dropped when it reaches the sampler

    def _release(self, req: RequestState) -> None:
        self.requests.pop(req.id, None)
        self.allocator.free(req.id)

    # ---- one block of attention on a batch of segments ---------------------------------
    def attend(self, b: int, segs: list[Segment], all_ranks: bool = False) -> list[Dispatch]:
        K = self.top_k
        x_TD = segs[0].x_TD if len(segs) == 1 else torch.cat([s.x_TD for s in segs])
        attn = [AttnSegment(s.start_pos, s.num_tokens, self.allocator.table(s.req.id)) for s in segs]
        h_TD = self.model.attention(b, x_TD, attn, self.kv)
        y_TD = self.model.moe_input(b, h_TD)
        prev_TK = None
        if b > 0 and all(s.route_TK is not None for s in segs):
            prev_TK = segs[0].route_TK if len(segs) == 1 else torch.cat([s.route_TK for s in segs])
        if self.skew is None:
            ids_TK, w_TK = self.model.route(b, y_TD)
        else:
            ids_TK, w_TK = self.skew.route(b, y_TD.shape[0], y_TD.dtype, y_TD.device, prev_TK)
        self.trace.record(b, ids_TK, prev_TK)
        s_TD = self.model.shared_expert(b, y_TD)

        lens = [s.num_tokens for s in segs]
        off = 0
        for s, n in zip(segs, lens):
            sl = slice(off, off + n)
            s.route_TK = ids_TK[sl]
            ctx = (h_TD[sl], w_TK[sl], None if s_TD is None else s_TD[sl])
            self.pool.open((s.seg_id, b), n, K, h_TD.shape[1], h_TD.dtype, context=ctx, device=self.device)
            self.segments[s.seg_id] = s
            off += n

        # Rows r = t*K + k, sorted by (owner rank, expert) so each rank gets contiguous runs.
        T = x_TD.shape[0]
        dev = self.device
        seg_T = torch.repeat_interleave(torch.tensor([s.seg_id for s in segs], dtype=torch.int32, device=dev),
                                        torch.tensor(lens, device=dev))
        tok_T = torch.cat([torch.arange(n, dtype=torch.int32, device=dev) for n in lens])
        expert_R = ids_TK.reshape(-1)
        E = self.spec.num_experts
        owner_R = self._owners(b, expert_R) if self.replicated else self.owner_BE[b][expert_R]
        order_R = torch.argsort(owner_R * E + expert_R, stable=True)
        t_R = order_R // K
        meta_R3 = torch.stack([seg_T[t_R], tok_T[t_R], (order_R % K).to(torch.int32)], dim=1)
        y_RD = y_TD[t_R]
        counts_RE = torch.bincount(owner_R * E + expert_R, minlength=self.expert_ranks * E)
        counts_RE = counts_RE.view(self.expert_ranks, E).tolist()

        out: list[Dispatch] = []
        start = 0
        for r in range(self.expert_ranks):
            n_r = sum(counts_RE[r])
            if n_r == 0 and not all_ranks:
                continue
            experts = [e for e in range(E) if counts_RE[r][e] > 0]
            header = {"b": b, "experts": experts, "counts": [counts_RE[r][e] for e in experts]}
            sl = slice(start, start + n_r)
            out.append(Dispatch(r, header, [meta_R3[sl].contiguous(), y_RD[sl].contiguous()]))
            start += n_r
        assert start == T * K
        return out

    def _owners(self, b: int, expert_R: torch.Tensor) -> torch.Tensor:
        """Rank of each row when experts are replicated: the rows of one expert, in row order,
        are cut into n nearly equal contiguous parts, part i to its i-th rank (primary first)."""
        R, E = expert_R.shape[0], self.spec.num_experts
        order_R = torch.argsort(expert_R, stable=True)
        count_E = torch.bincount(expert_R, minlength=E)
        start_E = torch.cumsum(count_E, 0) - count_E
        pos_R = torch.empty_like(expert_R)
        pos_R[order_R] = torch.arange(R, device=expert_R.device) - start_E[expert_R[order_R]]
        part_R = pos_R * self.n_BE[b][expert_R] // count_E[expert_R]
        return self.ranks_BEM[b][expert_R, part_R]

    # ---- expert outputs come back --------------------------------------------------------
    def deliver(self, b: int, meta_R3: torch.Tensor, out_RD: torch.Tensor) -> list[Segment]:
        """Scatter expert outputs into the pool; return segments whose block b is now complete
        (merged, advanced to block b+1)."""
        if meta_R3.shape[0] == 0:
            return []
        done: list[Segment] = []
        seg_R = meta_R3[:, 0]
        uniq = torch.unique(seg_R).tolist()
        for sid in uniq:
            if len(uniq) == 1:
                m, o = meta_R3, out_RD
            else:
                mask = seg_R == sid
                m, o = meta_R3[mask], out_RD[mask]
            key = (sid, b)
            if self.pool.add(key, m[:, 1].long(), m[:, 2].long(), o):
                out_TKD, (h_TD, w_TK, s_TD) = self.pool.pop(key)
                seg = self.segments.pop(sid)
                seg.x_TD = self.model.combine(h_TD, out_TKD, w_TK, s_TD)
                seg.block = b + 1
                done.append(seg)
        return done

    # ---- after the last block ----------------------------------------------------------
    def sample(self, segs: list[Segment]) -> tuple[list[TokenEvent], list[Segment]]:
        """Sample the next token of each segment; return events and new decode segments."""
        events: list[TokenEvent] = []
        live = []
        for s in segs:
            if s.req.cancelled:
                self._release(s.req)
                events.append(TokenEvent(s.req.id, None, "abort"))
            else:
                live.append(s)
        if not live:
            return events, []
        last_TD = torch.cat([s.x_TD[-1:] for s in live])
        logits_TV = self.model.logits(last_TD)
        tokens = self.sampler.sample(logits_TV, [s.req.params for s in live],
                                     [s.req.generator for s in live]).tolist()
        nxt_reqs: list[RequestState] = []
        nxt_tokens: list[int] = []
        for s, tok in zip(live, tokens):
            req = s.req
            req.num_cached = s.start_pos + s.num_tokens
            req.output.append(tok)
            reason = finish_reason(tok, len(req.output), req.params, self.eos)
            events.append(TokenEvent(req.id, tok, reason))
            if reason is None:
                nxt_reqs.append(req)
                nxt_tokens.append(tok)
            else:
                self._release(req)
        if not nxt_reqs:
            return events, []
        x_TD = self.model.embed(torch.tensor(nxt_tokens, dtype=torch.long))
        new = [Segment(next(self._seg_ids), req, 0, x_TD[i:i + 1], req.num_cached)
               for i, req in enumerate(nxt_reqs)]
        return events, new

    def fail_all(self, error: str) -> list[TokenEvent]:
        events = [TokenEvent(rid, None, "error", error) for rid in list(self.requests)]
        for req in list(self.requests.values()):
            self._release(req)
        return events
