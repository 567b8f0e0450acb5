"""Attention-rank state machine: requests, KV, attention + routing, top-k merge, sampling.

It performs no communication: `attend` returns the per-expert-rank dispatch payloads and
`deliver` takes expert outputs back, so the AEP loop, the lockstep loop and local mode all
drive the same code.

Legend: T tokens in a batch, D hidden, K top-k, R rows sent to experts (T*K), V vocab.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import amoe_kernels
from amoe_serve.engine.skew import ExponentialSkew
from amoe_serve.kv.allocator import BlockAllocator
from amoe_serve.kv.cache import PagedKVCache
from amoe_serve.placement.layout import Placement
from amoe_serve.kv.batch import PagedBatch
from amoe_serve.model import AttentionSide
from amoe_serve.placement.trace import TraceRecorder
from amoe_serve.sampler import (RowState, Sampler, SamplingParams, finish_reason, make_generator, prompt_logprobs,
                                token_logprobs)
from amoe_serve.sched.token_pool import TokenPool
from amoe_serve.token_events import TokenEvent


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
    table_M: Optional[torch.Tensor] = None  # its KV block table (reserved whole at admission)
    state: Optional[RowState] = None  # sampler memory, only for params that need it (penalties, grammar)


@dataclass
class Segment:
    """Requests' new tokens travelling through the blocks together (prompts, or one decode token
    each): one attention call, one dispatch, one token-pool entry and one combine per block, so
    no per-request work happens between the sampler and the next sampler.
    Rows of x_TD are the spans' tokens in order: n_S[i] rows for reqs[i] at positions start_S[i]..
    """
    seg_id: int
    reqs: list[RequestState]
    block: int
    x_TD: torch.Tensor
    start_S: list[int]
    n_S: list[int]
    wave: int = 0  # AEP micro-wave (the attention μ-queue slot) it travels in
    route_TK: Optional[torch.Tensor] = None  # experts at the previous block (traces, affinity)
    paged: Optional[PagedBatch] = None  # KV addressing, built at the first block of a step

    @property
    def num_tokens(self) -> int:
        return self.x_TD.shape[0]


@dataclass
class Dispatch:
    dst_index: int  # expert-rank index
    header: dict
    tensors: list[torch.Tensor]


class AttentionCore:
    def __init__(self, model: AttentionSide, placement: Placement,
                 kv: PagedKVCache, allocator: BlockAllocator, eos_token_ids: tuple[int, ...],
                 skew: Optional[ExponentialSkew] = None, trace_window_tokens: int = 512,
                 grammar_backend: Optional[Callable[[], object]] = None):
        self.model = model
        self.spec = model.spec
        self.skew = skew
        self.top_k = skew.top_k if skew is not None else model.spec.top_k
        self.device = kv.k_LNSGd.device
        self.owner_BE = torch.as_tensor(placement.owner_table(), dtype=torch.int64, device=self.device)
        # Dispatch sort key of each (block, expert): owner rank * E + expert, looked up in one op.
        E = self.spec.num_experts
        self.key_BE = self.owner_BE * E + torch.arange(E, device=self.device)
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
        # Built on the first structured-output request (sampler.grammar.GrammarBackend).
        self._grammar_factory = grammar_backend
        self._grammar = None
        self.pool = TokenPool()
        self.requests: dict[str, RequestState] = {}
        self._seg_ids = itertools.count()
        self.segments: dict[int, Segment] = {}  # in the pool, waiting for expert outputs

    # ---- requests ---------------------------------------------------------------------
    def admit(self, rid: str, prompt: list[int], params: SamplingParams, wave: int = 0) -> Segment:
        """Reserve KV for the whole request up front (no preemption needed) and embed the prompt."""
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already running")
        params.check_vocab(self.spec.vocab_size)
        state = None
        if params.needs_processing:  # before the KV is reserved: a bad grammar must not leak it
            matcher = self._grammar_backend().matcher(params.structured) if params.structured is not None else None
            state = RowState(params, prompt, self.spec.vocab_size, self.eos, matcher)
        table = self.allocator.allocate(rid, len(prompt) + params.max_tokens)
        req = RequestState(rid, list(prompt), params, make_generator(params.seed), wave=wave,
                           table_M=torch.as_tensor(table, dtype=torch.int64, device=self.device), state=state)
        self.requests[rid] = req
        x_TD = self.model.embed(torch.tensor(prompt, dtype=torch.long))
        return Segment(next(self._seg_ids), [req], 0, x_TD, [0], [len(prompt)], wave)

    def _grammar_backend(self):
        if self._grammar is None:
            if self._grammar_factory is None:
                raise ValueError("structured output is not available on this data plane (no tokenizer)")
            self._grammar = self._grammar_factory()
        return self._grammar

    def cancel(self, rid: str) -> None:
        req = self.requests.get(rid)
        if req is not None:
            req.cancelled = True  # its in-flight segment is dropped when it reaches the sampler

    def _release(self, req: RequestState) -> None:
        self.requests.pop(req.id, None)
        self.allocator.free(req.id)

    def merge(self, segs: list[Segment]) -> Segment:
        """One segment of several queued at the same block (same wave): their KV addressing is
        rebuilt for the union at attention time."""
        if len(segs) == 1:
            return segs[0]
        routes = [s.route_TK for s in segs]
        return Segment(next(self._seg_ids), [r for s in segs for r in s.reqs], segs[0].block,
                       torch.cat([s.x_TD for s in segs]), [p for s in segs for p in s.start_S],
                       [n for s in segs for n in s.n_S], segs[0].wave,
                       torch.cat(routes) if all(r is not None for r in routes) else None)

    # ---- one block of attention on a batch of segments ---------------------------------
    def attend(self, b: int, segs: list[Segment], all_ranks: bool = False) -> list[Dispatch]:
        """Block b's attention, routing and dispatch for the merged segments; the merged segment
        waits in the token pool for its expert outputs."""
        K = self.top_k
        seg = self.merge(segs)
        if seg.paged is None:
            seg.paged = self.kv.batch([r.table_M for r in seg.reqs], seg.start_S, seg.n_S)
        x_TD = seg.x_TD
        T = x_TD.shape[0]
        E = self.spec.num_experts
        prev_TK = seg.route_TK if b > 0 else None
        skew = None if self.skew is None else self.skew.route(b, T, x_TD.dtype, x_TD.device, prev_TK)
        # The block in one to three native calls (the same bits as the calls below).
        fused = None if self.replicated else self.model.block_step(
            b, x_TD, seg.paged, self.kv, self.key_BE[b], self.expert_ranks * E, seg.seg_id, skew)
        if fused is not None:
            h_TD, y_TD, w_TK, ids_TK, meta_R3, y_RD, counts_X = fused
        else:
            h_TD = self.model.attention(b, x_TD, seg.paged, self.kv)
            y_TD = self.model.moe_input(b, h_TD)
            ids_TK, w_TK = self.model.route(b, y_TD) if skew is None else skew
        self.trace.record(b, ids_TK, prev_TK)
        s_TD = self.model.shared_expert(b, y_TD) if self.model.has_shared_expert else None
        seg.route_TK = ids_TK
        self.pool.open((seg.seg_id, b), T, K, h_TD.shape[1], h_TD.dtype, context=(h_TD, w_TK, s_TD), device=self.device)
        self.segments[seg.seg_id] = seg

        if fused is None:  # rows r = t*K + k, sorted by (owner rank, expert): contiguous runs per rank
            expert_R = ids_TK.reshape(-1)
            key_R = self._owners(b, expert_R) * E + expert_R if self.replicated else self.key_BE[b][expert_R]
            meta_R3, y_RD, counts_X = amoe_kernels.dispatch_rows(y_TD, key_R, K, seg.seg_id, self.expert_ranks * E)
        counts_RE = counts_X.view(self.expert_ranks, E).tolist()

        out: list[Dispatch] = []
        start = 0
        for r, counts_E in enumerate(counts_RE):  # expert ranks, not tokens
            n_r = sum(counts_E)
            if n_r == 0 and not all_ranks:
                continue
            experts = [e for e in range(E) if counts_E[e] > 0]
            header = {"b": b, "seg": seg.seg_id, "experts": experts, "counts": [counts_E[e] for e in experts]}
            sl = slice(start, start + n_r)
            out.append(Dispatch(r, header, [meta_R3[sl], y_RD[sl]]))
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
    def deliver(self, b: int, meta_R3: torch.Tensor, out_RD: torch.Tensor,
                segs: Optional[list[int]] = None) -> list[Segment]:
        """Scatter expert outputs into the pool; return segments whose block b is now complete
        (merged, advanced to block b+1). segs: the segment ids the rows belong to, when the reply
        says (else they are read from the rows)."""
        if meta_R3.shape[0] == 0:
            return []
        done: list[Segment] = []
        seg_R = meta_R3[:, 0]
        # Usually one: an expert rank answers per step.
        uniq = list(segs) if segs else torch.unique(seg_R).tolist()
        for sid in uniq:
            if len(uniq) == 1:
                m, o = meta_R3, out_RD
            else:
                mask = seg_R == sid
                m, o = meta_R3[mask], out_RD[mask]
            key = (sid, b)
            if self.pool.add(key, m[:, 1], m[:, 2], o):
                out_TKD, (h_TD, w_TK, s_TD) = self.pool.pop(key)
                seg = self.segments.pop(sid)
                seg.x_TD = self.model.combine(h_TD, out_TKD, w_TK, s_TD)
                seg.block = b + 1
                done.append(seg)
        return done

    # ---- after the last block ----------------------------------------------------------
    def sample(self, segs: list[Segment]) -> tuple[list[TokenEvent], list[Segment]]:
        """Sample the next token of each request; return events and the requests' next decode
        segments (one per wave)."""
        events: list[TokenEvent] = []
        rows: list[int] = []
        live: list[tuple[RequestState, int]] = []  # request, its start + n after this step
        prompt_spans: list[tuple[int, int, int]] = []  # (live index, first row, rows) for prompt_logprobs
        base = 0
        parts = []
        for s in segs:
            last = 0
            for req, st, n in zip(s.reqs, s.start_S, s.n_S):
                if req.cancelled:
                    self._release(req)
                    events.append(TokenEvent(req.id, None, "abort"))
                else:
                    if req.params.prompt_logprobs is not None and not req.output:
                        prompt_spans.append((len(live), base + last, n))
                    rows.append(base + last + n - 1)
                    live.append((req, st + n))
                last += n
            base += s.num_tokens
            parts.append(s.x_TD)
        if not live:
            return events, []
        x_TD = parts[0] if len(parts) == 1 else torch.cat(parts)
        last_TD = x_TD[torch.tensor(rows, dtype=torch.int64, device=x_TD.device)] if len(rows) != x_TD.shape[0] else x_TD
        logits_TV = self.model.logits(last_TD)
        reqs = [r for r, _ in live]
        tokens_B = self.sampler.sample(logits_TV, [r.params for r in reqs], [r.generator for r in reqs],
                                       [r.state for r in reqs])
        tokens = tokens_B.tolist()
        lps = self._logprobs(logits_TV, tokens_B, reqs)
        plps = {i: prompt_logprobs(self.model.logits(x_TD[r0:r0 + n]), reqs[i].prompt, reqs[i].params.prompt_logprobs)
                for i, r0, n in prompt_spans}
        nxt_reqs: list[RequestState] = []
        nxt_tokens: list[int] = []
        for i, ((req, cached), tok) in enumerate(zip(live, tokens)):
            req.num_cached = cached
            req.output.append(tok)
            if req.state is not None:
                req.state.accept(tok)
            reason = finish_reason(tok, len(req.output), req.params, self.eos)
            events.append(TokenEvent(req.id, tok, reason, None, lps.get(i), plps.get(i)))
            if reason is None:
                nxt_reqs.append(req)
                nxt_tokens.append(tok)
            else:
                self._release(req)
        if not nxt_reqs:
            return events, []
        x_TD = self.model.embed(torch.tensor(nxt_tokens, dtype=torch.long))
        waves = sorted({r.wave for r in nxt_reqs})
        new = []
        for w in waves:  # each wave's requests travel on in their own segment
            idx = [i for i, r in enumerate(nxt_reqs) if r.wave == w]
            reqs = [nxt_reqs[i] for i in idx]
            x_w = x_TD if len(waves) == 1 else x_TD[torch.tensor(idx, device=x_TD.device)]
            new.append(Segment(next(self._seg_ids), reqs, 0, x_w, [r.num_cached for r in reqs], [1] * len(reqs), w))
        return events, new
    @staticmethod
    def _logprobs(logits_BV: torch.Tensor, tokens_B: torch.Tensor, reqs: list[RequestState]) -> dict:
        """{row: TokenLogprobs} for the rows whose requests asked for logprobs (raw logits)."""
        want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        if not want:
            return {}
        idx = torch.tensor(want, device=logits_BV.device)
        got = token_logprobs(logits_BV[idx], tokens_B[idx], [reqs[i].params.logprobs for i in want])
        return dict(zip(want, got))

    def fail_all(self, error: str) -> list[TokenEvent]:
        events = [TokenEvent(rid, None, "error", error) for rid in list(self.requests)]
        for req in list(self.requests.values()):
            self._release(req)
        return events
