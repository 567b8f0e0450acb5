"""Request admission and load balancing over attention ranks.

KV is reserved for a whole request (prompt + max_tokens) when it is placed, so an attention
rank never runs out mid-generation and no preemption is needed. New requests go to the
attention rank with the most free KV blocks and stay there (their KV never moves).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

from amoe_serve.requests_io import GenerateRequest


@dataclass
class Limits:
    max_model_len: int
    block_size: int
    blocks_per_rank: int
    max_running_per_rank: int

    def blocks_for(self, req: GenerateRequest) -> int:
        n = len(req.prompt_token_ids) + req.params.max_tokens
        return -(-n // self.block_size)

    def check(self, req: GenerateRequest) -> Optional[str]:
        """A reason the request can never run, or None."""
        n_prompt, n_max = len(req.prompt_token_ids), req.params.max_tokens
        if n_prompt + n_max > self.max_model_len:
            return (f"prompt ({n_prompt} tokens) + max_tokens ({n_max}) = {n_prompt + n_max} "
                    f"exceeds the context limit of {self.max_model_len} tokens")
        if self.blocks_for(req) > self.blocks_per_rank:
            cap = self.blocks_per_rank * self.block_size
            return (f"prompt + max_tokens needs {n_prompt + n_max} KV slots but an attention rank "
                    f"holds {cap}; raise kv_cache.num_blocks")
        return None


class Admission:
    def __init__(self, ranks: list[int], limits: Limits):
        self.limits = limits
        self.free = {r: limits.blocks_per_rank for r in ranks}
        self.running = {r: 0 for r in ranks}
        self.waiting: deque[GenerateRequest] = deque()
        self.placed: dict[str, tuple[int, int]] = {}  # id -> (rank, blocks)

    def enqueue(self, req: GenerateRequest) -> None:
        self.waiting.append(req)

    def next_placements(self) -> list[tuple[GenerateRequest, int]]:
        """Place waiting requests in arrival order while some rank has room."""
        out = []
        while self.waiting:
            req = self.waiting[0]
            need = self.limits.blocks_for(req)
            ok = [r for r in self.free
                  if self.free[r] >= need and self.running[r] < self.limits.max_running_per_rank]
            if not ok:
                break
            rank = max(ok, key=lambda r: (self.free[r], -r))
            self.waiting.popleft()
            self.free[rank] -= need
            self.running[rank] += 1
            self.placed[req.id] = (rank, need)
            out.append((req, rank))
        return out

    def release(self, rid: str) -> None:
        rank, need = self.placed.pop(rid)
        self.free[rank] += need
        self.running[rank] -= 1

    def drop_waiting(self, rid: str) -> bool:
        for req in self.waiting:
            if req.id == rid:
                self.waiting.remove(req)
                return True
        return False

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.placed
