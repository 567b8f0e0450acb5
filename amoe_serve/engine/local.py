"""`local` mode: one process, no ranks, the reference every other mode is checked against.

It drives the same AttentionCore and ExpertCore as the ranks, block by block, with the
expert exchange replaced by direct calls.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable

from amoe_serve.config import AmoeConfig
from amoe_serve.engine.admission import Admission
from amoe_serve.engine.attention_core import Segment
from amoe_serve.engine.job import limits, make_attention_core, make_expert_core
from amoe_serve.placement.layout import Placement
from amoe_serve.model import ModelSpec
from amoe_serve.requests_io import GenerateRequest, GenerateResult


class LocalEngine:
    def __init__(self, cfg: AmoeConfig, spec: ModelSpec):
        self.spec = spec
        self.limits = limits(cfg, spec)
        self.max_batch_tokens = cfg.engine.max_batch_tokens
        place = Placement.contiguous(spec.num_blocks, spec.num_experts, 1)
        self.core = make_attention_core(cfg, spec, place)
        cfg_one = replace(cfg, scheduler=replace(cfg.scheduler, group_block=True))
        self.experts = make_expert_core(cfg_one, spec, place.pairs_of(0))

    def generate(self, requests: Iterable[GenerateRequest]) -> dict[str, GenerateResult]:
        results: dict[str, GenerateResult] = {}
        adm = Admission([0], self.limits)
        for req in requests:
            res = results[req.id] = GenerateResult(req.id)
            err = self.limits.check(req)
            if err is not None:
                res.error, res.finish_reason = err, "error"
            else:
                adm.enqueue(req)
        ready: list[Segment] = []
        while not adm.idle:
            for req, _ in adm.next_placements():
                ready.append(self.core.admit(req.id, req.prompt_token_ids, req.params))
            batch, budget = [], self.max_batch_tokens
            while ready and (not batch or ready[0].num_tokens <= budget):
                budget -= ready[0].num_tokens
                batch.append(ready.pop(0))
            for b in range(self.spec.num_blocks):
                for d in self.core.attend(b, batch):
                    self.experts.receive(0, d.header, *d.tensors)
                done: list[Segment] = []
                for r in self.experts.drain_block(b):
                    done.extend(self.core.deliver(b, *r.tensors, r.header.get("segs")))
                batch = done
            events, new = self.core.sample(batch)
            ready.extend(new)
            for ev in events:
                results[ev.request_id].record(ev)
                if ev.finish_reason is not None:
                    adm.release(ev.request_id)
        return results
