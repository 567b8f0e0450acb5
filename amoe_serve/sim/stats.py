"""Per-request token times and their summary (throughput, ITL, TTFT over the measurement
window), and the gateway that places requests on attention ranks (fewest running, i.e. most free
KV, like the real gateway's most-free-KV rule; KV for prompt + output reserved up front)."""
from __future__ import annotations

import numpy as np

from .params import SimParams
from .workload import Workload


class Stats:
    """Per-request token times; summaries over the measurement window."""

    def __init__(self, wl: Workload, p: SimParams, num_gpus: int) -> None:
        self.wl, self.p = wl, p
        n = len(wl.prompt)
        self.generated = np.zeros(n, dtype=np.int64)
        self.first = np.full(n, np.nan)
        self.last = np.full(n, np.nan)
        self.done_at = np.full(n, np.nan)
        self.admitted = np.full(n, np.nan)     # placed on an attention rank (TTFT from admission)
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
        adm = (self.first - self.admitted)[(~np.isnan(self.admitted)) & (self.first >= w0)
                                           & (self.preset == 0)]
        pct = lambda a, q: float(np.percentile(a, q) * 1e3) if a.size else float("nan")  # noqa: E731
        return {
            "tokens_per_s": tokens / span,
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99),
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "ttft_admitted_ms_p99": pct(adm, 99),
            "mean_expert_batch": self.expert_batch_rows / max(self.expert_batches, 1),
            "mean_attention_batch": self.attn_batch_tokens / max(self.attn_batches, 1),
            "idle_fraction": float(1.0 - np.mean(np.minimum(self.busy / max(end, 1e-12), 1.0))),
            "simulated_seconds": end,
            "requests_done": int(np.count_nonzero(~np.isnan(self.done_at))),
            "output_tokens": int(self.generated.sum() - self.preset.sum()),
            "measured_tokens": tokens,
        }


class SimGateway:
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
