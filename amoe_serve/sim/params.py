"""Parameters of one simulated deployment (the knobs both systems share, plus AEP's waves)."""
from __future__ import annotations

import math
from dataclasses import dataclass


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
    min_wave_requests: int = 1  # as SchedulerConfig.min_wave_requests (a wave opens at this many)
    # AEP expert ranks' ExpertGate, as SchedulerConfig.expert_min_rows / expert_max_wait_ms (0: off).
    expert_min_rows: int = 0
    expert_max_wait_s: float = 0.0
