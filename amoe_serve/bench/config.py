"""Benchmark configuration (OmegaConf structured)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from amoe_serve.config import ConfigError, RoutingConfig, merge_structured

SYSTEMS = ("aep", "lockstep", "hf-transformers")


@dataclass
class BenchModelConfig:
    """A checkpoint folder, or (path null) the bench model generated with random weights in the
    shape of the paper's Mixtral, sized for a 2-core CPU."""
    path: Optional[str] = None
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_blocks: int = 8
    num_experts: int = 8
    top_k: int = 2
    num_heads: int = 16
    num_kv_heads: int = 4
    head_dim: int = 64
    vocab_size: int = 32000
    seed: int = 0


@dataclass
class BenchConfig:
    model: BenchModelConfig = field(default_factory=BenchModelConfig)
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    workloads: list[str] = field(default_factory=lambda: ["short"])
    # Poisson arrival rates in requests/s; 0 = offline (every request submitted at once).
    request_rates: list[float] = field(default_factory=lambda: [0.0])
    num_requests: int = 64
    attention_ranks: int = 1
    expert_ranks: int = 2
    routing: RoutingConfig = field(default_factory=lambda: RoutingConfig(mode="exponential", rate=0.5, top_k=1))
    # Data-plane overrides for both AEP and lockstep (same batching limits), then each one's own.
    dataplane: list[str] = field(default_factory=list)
    aep: list[str] = field(default_factory=list)
    lockstep: list[str] = field(default_factory=list)
    # transformers generate: static batches of this many prompts, left-padded.
    hf_batch_size: int = 16
    seed: int = 0
    # After the runs: calibrate the simulator's local table here and compare its predicted
    # AEP/lockstep ratio at saturation with the measured one (sim_check.json).
    sim_check: bool = False
    # Give up on one system/rate point after this many seconds.
    point_timeout_s: float = 900.0


def load_bench_config(path: str | Path | None, overrides: list[str] | None = None) -> BenchConfig:
    cfg: BenchConfig = merge_structured(BenchConfig, path, overrides, "bench configuration")
    bad = [s for s in cfg.systems if s not in SYSTEMS]
    if bad:
        raise ConfigError(f"bench systems {bad}: expected some of {', '.join(SYSTEMS)}")
    from amoe_serve.bench.workloads import WORKLOADS
    bad = [w for w in cfg.workloads if w not in WORKLOADS]
    if bad:
        raise ConfigError(f"bench workloads {bad}: expected some of {', '.join(WORKLOADS)}")
    if cfg.num_requests < 1 or any(r < 0 for r in cfg.request_rates):
        raise ConfigError("num_requests must be >= 1 and request rates >= 0")
    return cfg
