"""Structured (OmegaConf) configuration of the cluster simulator (`amoe-serve sim`).

Plain data only; `load_sim_config` merges schema defaults, a YAML file and dotlist overrides,
then validates.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from amoe_serve.config import ConfigError, merge_structured
from amoe_serve.sched.policies import POLICIES

SYSTEMS = ("aep", "lockstep")
ARRIVALS = ("offline", "poisson")
# Workload presets from the paper (uniform lengths): (input lo, hi), (output lo, hi).
WORKLOADS = {
    "short": ((30, 70), (70, 130)),
    "medium": ((50, 150), (50, 250)),
    "reasonable": ((100, 300), (100, 500)),
}


@dataclass
class SimModelConfig:
    """Shape of the served model (defaults: Mixtral 8x7B with MQA, as in the AMoE paper)."""
    name: str = "mixtral-8x7b"
    hidden: int = 4096
    ffn: int = 14336
    num_blocks: int = 32
    num_experts: int = 8
    top_k: int = 1
    num_heads: int = 32
    num_kv_heads: int = 1        # the paper replaced GQA by MQA
    head_dim: int = 128
    vocab: int = 32000
    dtype_bytes: int = 2         # bf16
    shared_experts: int = 0      # always-on experts (DeepSeek style), run on the attention side
    shared_ffn: int = 0          # their FFN size each


@dataclass
class SimClusterConfig:
    # Cluster sizes to simulate (one set of records per size).
    gpus: list[int] = field(default_factory=lambda: [8, 16])
    # AEP: fraction of the GPUs that run attention (the rest run experts). 0.5 = the paper's 4+4.
    attention_fraction: float = 0.5
    # Device table: "a100" | "h100" | "local", or a YAML file with a table (e.g. a calibration).
    device: str = "a100"
    # Override the table's GPUs per node (0 = keep the table's value).
    gpus_per_node: int = 0
    # Override the table's core limit (0 = keep; the local table limits concurrent compute).
    cores: int = 0
    # YAML of measured host costs overriding the table's (attn/expert_step_overhead_s,
    # msg_send_s, msg_recv_s), e.g. configs/sim/host-measured.yaml; "" = the table's own.
    host: str = ""


@dataclass
class SimWorkloadConfig:
    name: str = "short"                      # short | medium | reasonable (sets lengths if empty)
    input_len: list[int] = field(default_factory=list)    # [lo, hi] uniform; empty = preset
    output_len: list[int] = field(default_factory=list)   # [lo, hi] uniform; empty = preset
    arrival: str = "offline"                 # offline: all requests at t=0 | poisson
    # Poisson: requests per second per GPU of the cluster (a list sweeps load).
    request_rates: list[float] = field(default_factory=lambda: [1.0])
    num_requests: int = 4000                 # offline backlog / poisson cap
    duration_s: float = 3.0                  # simulated seconds (0 = until every request finishes)
    warmup_s: float = 0.5                    # excluded from throughput / latency statistics
    # Routing: expert rank i (0 = hottest) has probability ~ exp(-skew_rate * i); 0 = uniform.
    skew_rate: float = 0.5
    # Draw which expert is hottest independently per block (else the same ranking everywhere).
    hot_expert_per_block: bool = True
    # Offline steady state: requests placed at t=0 start mid-generation (uniform progress, KV
    # already filled, no prefill), so the run does not begin with one synchronized prefill wave
    # that makes every request finish at once. Same for every system.
    warm_start: bool = True
    seed: int = 0


@dataclass
class SimSystemsConfig:
    systems: list[str] = field(default_factory=lambda: ["aep", "lockstep"])
    policies: list[str] = field(default_factory=lambda: ["defrag"])   # AEP policies compared
    lookahead: int = 3
    decay: float = 0.8
    # Continuous batching limits, identical for both systems, per attention rank (DP replica).
    max_running_requests: int = 160
    max_batch_tokens: int = 2048
    max_expert_batch: int = 512
    group_block: bool = True
    # Lockstep's own knob, tuned for its best throughput: running requests per DP rank.
    # Every value is simulated; the record with the best tokens/s is reported as lockstep.
    lockstep_max_running: list[int] = field(default_factory=lambda: [64, 128, 160, 256, 384, 512])
    # AEP's batch-limit sweep (same idea; empty = only max_running_requests).
    aep_max_running: list[int] = field(default_factory=list)
    # AEP attention micro-waves (amoe_serve.sched.waves.WaveGate), as the real config's
    # scheduler.attention_waves / attention_max_wait_ms (waves 1 + max_wait 0 = no gate).
    attention_waves: int = 2
    attention_max_wait_ms: float = 1000.0
    # AEP's wave sweep, part of its own tuning (empty = only attention_waves).
    aep_waves: list[int] = field(default_factory=list)
    # Lockstep layout: "colocated" = every GPU runs DP attention and EP experts (SGLang/vLLM);
    # "split" = the same attention/expert ranks as AEP with a per-block barrier (this repo's mode).
    lockstep_layout: str = "colocated"
    # Lockstep's duration/warmup are multiplied by this (its tokens come in iteration bursts).
    lockstep_window_scale: float = 4.0
    # Expert placement for both systems: contiguous | replicate (greedy balancing with 0 copies,
    # EPLB-style redundant experts otherwise); `replicas` (extra copies per rank per block) swept.
    placement: str = "contiguous"
    replicas: list[int] = field(default_factory=lambda: [0])
    # AEP's attention:expert split sweep, as fractions of the GPUs (empty = cluster.attention_fraction).
    aep_attention_fractions: list[float] = field(default_factory=list)
    min_wave_requests: int = 1   # as scheduler.min_wave_requests
    # AEP expert ranks' ExpertGate (sched.expert_plan): hold a block until it has this many rows
    # or its oldest row waited expert_max_wait_ms (0: off). aep_expert_min_rows sweeps it.
    expert_min_rows: int = 0
    expert_max_wait_ms: float = 0.0
    aep_expert_min_rows: list[int] = field(default_factory=list)


@dataclass
class SimNoiseConfig:
    cv: float = 0.0              # lognormal per-operation time noise (coefficient of variation)
    slow_gpus: list[int] = field(default_factory=list)
    slow_factor: float = 0.0     # e.g. 0.2: those GPUs take 20% longer


@dataclass
class SimGoodputConfig:
    """Goodput at an SLO (the headline): per system, the highest running-request limit (or
    Poisson rate) whose ITL p50 <= the TPOT SLO and TTFT p99 <= the bound, tokens/s per GPU there."""
    enabled: bool = False
    tpot_slo_ms: list[float] = field(default_factory=lambda: [50.0, 100.0])
    ttft_p99_ms: float = 2000.0
    ablation: bool = False       # also write the ablation table (ablation.json / .md)
    ablation_gpus: int = 16


@dataclass
class SimConfig:
    model: SimModelConfig = field(default_factory=SimModelConfig)
    cluster: SimClusterConfig = field(default_factory=SimClusterConfig)
    workload: SimWorkloadConfig = field(default_factory=SimWorkloadConfig)
    run: SimSystemsConfig = field(default_factory=SimSystemsConfig)
    noise: SimNoiseConfig = field(default_factory=SimNoiseConfig)
    goodput: SimGoodputConfig = field(default_factory=SimGoodputConfig)


def validate_sim(cfg: SimConfig) -> SimConfig:
    m, c, w, r = cfg.model, cfg.cluster, cfg.workload, cfg.run
    for name in ("hidden", "ffn", "num_blocks", "num_experts", "top_k", "num_heads", "num_kv_heads",
                 "head_dim", "dtype_bytes"):
        if getattr(m, name) < 1:
            raise ConfigError(f"model.{name} must be >= 1")
    if m.top_k > m.num_experts:
        raise ConfigError("model.top_k must be <= model.num_experts")
    if not c.gpus or any(g < 2 for g in c.gpus):
        raise ConfigError("cluster.gpus must list sizes >= 2")
    if not (0.0 < c.attention_fraction < 1.0):
        raise ConfigError("cluster.attention_fraction must be in (0, 1)")
    if w.arrival not in ARRIVALS:
        raise ConfigError(f"workload.arrival={w.arrival!r}: expected one of {', '.join(ARRIVALS)}")
    if not w.input_len and w.name not in WORKLOADS:
        raise ConfigError(f"workload.name={w.name!r}: expected one of {', '.join(WORKLOADS)} "
                          "or explicit input_len/output_len")
    for name in ("input_len", "output_len"):
        v = getattr(w, name)
        if v and (len(v) != 2 or v[0] < 1 or v[1] < v[0]):
            raise ConfigError(f"workload.{name} must be [lo, hi] with 1 <= lo <= hi")
    if w.num_requests < 1 or w.duration_s < 0 or w.warmup_s < 0 or w.skew_rate < 0:
        raise ConfigError("workload.num_requests >= 1, duration_s/warmup_s/skew_rate >= 0")
    if w.duration_s and w.warmup_s >= w.duration_s:
        raise ConfigError("workload.warmup_s must be < duration_s")
    if any(s not in SYSTEMS for s in r.systems) or not r.systems:
        raise ConfigError(f"run.systems: expected a non-empty subset of {', '.join(SYSTEMS)}")
    if any(p not in POLICIES for p in r.policies) or not r.policies:
        raise ConfigError(f"run.policies: expected a non-empty subset of {', '.join(POLICIES)}")
    if r.lockstep_layout not in ("colocated", "split"):
        raise ConfigError("run.lockstep_layout must be colocated or split")
    if min([r.attention_waves, *r.aep_waves]) < 1 or r.attention_max_wait_ms < 0:
        raise ConfigError("run.attention_waves / aep_waves must be >= 1 and attention_max_wait_ms >= 0")
    if min([r.max_running_requests, r.max_batch_tokens, r.max_expert_batch, *r.lockstep_max_running,
            *r.aep_max_running]) < 1:
        raise ConfigError("run batch limits must be >= 1")
    if r.placement not in ("contiguous", "replicate") or min(r.replicas or [0]) < 0 or not r.replicas:
        raise ConfigError("run.placement must be contiguous or replicate and run.replicas a list of >= 0")
    if any(not (0.0 < f < 1.0) for f in r.aep_attention_fractions):
        raise ConfigError("run.aep_attention_fractions must lie in (0, 1)")
    if cfg.noise.cv < 0 or cfg.noise.slow_factor < 0:
        raise ConfigError("noise.cv and noise.slow_factor must be >= 0")
    if cfg.goodput.enabled and (not cfg.goodput.tpot_slo_ms or min(cfg.goodput.tpot_slo_ms) <= 0):
        raise ConfigError("goodput.tpot_slo_ms must list SLOs > 0")
    return cfg


def lengths(w: SimWorkloadConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    pin, pout = WORKLOADS.get(w.name, ((1, 1), (1, 1)))
    return (tuple(w.input_len) if w.input_len else pin), (tuple(w.output_len) if w.output_len else pout)


def load_sim_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SimConfig:
    return validate_sim(merge_structured(SimConfig, path, overrides, "simulator configuration"))
