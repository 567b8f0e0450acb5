"""Structured (OmegaConf) configuration: one dataclass per component.

Runtime objects (communicators, transports, tensors) never live here; configs are plain data
that can be written to YAML, handed to every rank of an MPI job and read back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from amoe_serve.errors import UserInputError

MODES = ("local", "lockstep", "aep")
POLICIES = ("defrag", "mtfs", "flfs")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(UserInputError, ValueError):
    """A configuration value is invalid; the message says which and why."""


@dataclass
class ModelConfig:
    # Folder with config.json + *.safetensors; None means the embedded default model.
    path: Optional[str] = None
    # Weights at rest; "auto" keeps the checkpoint's dtype.
    dtype: str = "float32"
    # Activations, KV cache and GEMM accumulation; "auto" = model.dtype. "float32" over bf16
    # weights is the CPU choice where bf16 GEMMs are slow (no AVX512-BF16/AMX; docs/bench/fullsize).
    compute_dtype: str = "auto"


@dataclass
class DeploymentConfig:
    mode: str = "aep"
    attention_ranks: int = 1
    expert_ranks: int = 2
    # Placement file (`amoe-serve place` writes one; format in amoe_serve/placement/layout.py):
    # each (block, expert)'s expert-rank index in [0, expert_ranks), plus optional replicas.
    # None places experts contiguously.
    placement: Optional[str] = None


@dataclass
class SchedulerConfig:
    policy: str = "defrag"
    # Defrag look-ahead depth K and decay delta (DESIGN.md section 4).
    lookahead: int = 3
    decay: float = 0.8
    # Upper bound on rows drained from expert queues in one step.
    max_expert_batch: int = 512
    # Run all ready queues of the picked block as one grouped step on expert ranks.
    group_block: bool = True
    # Attention ranks (AEP): a wave's queue at block b waits for the wave's segments still at
    # the experts (at block 0: for the whole wave to come back, so new requests join it) rather
    # than run a fragment; this many ms is the most it waits.
    attention_max_wait_ms: float = 1000.0
    # Attention ranks (AEP): requests are split into this many waves that move through the
    # blocks independently (μ-queue slot = wave), so attention of one wave overlaps the expert
    # work of another. Lockstep always runs one. 0 = auto (sched.waves.auto_waves): 2 on GPUs
    # and on CPUs where every compute rank of a node has its own cores, else 1.
    attention_waves: int = 0
    # A further wave opens only once every active wave would hold this many requests.
    min_wave_requests: int = 16
    # Expert ranks (AEP): hold a block's queues until they have this many rows or their oldest
    # row waited expert_max_wait_ms (sched.expert_plan.ExpertGate); 0 = off, run what landed.
    expert_min_rows: int = 0
    expert_max_wait_ms: float = 0.0


@dataclass
class ExpertBufferConfig:
    """Expert Buffering (Huang et al.): an expert rank keeps only `slots` experts resident in
    fast memory (GPU memory; on CPU a resident set) and loads the others on demand from the
    memory-mapped checkpoint. 0 keeps every expert it owns resident."""
    slots: int = 0
    # Which resident expert makes room: "lifo" (the paper's), "lru" or "fifo"; experts active
    # in the current batch are never evicted first.
    eviction: str = "lifo"
    # Load the experts the next steps will need on a background thread while this one computes.
    prefetch: bool = True
    # Benchmarks: the expert ranks' final stats carry every step's experts (for offline replay
    # of eviction policies). Grows with the run: off when serving.
    record_accesses: bool = False


@dataclass
class RoutingConfig:
    """Which experts tokens go to. "model": the checkpoint's router (serving). "exponential":
    the AMoE paper's benchmark skew, p(expert) ~ exp(-rate * popularity rank), per block."""
    mode: str = "model"
    rate: float = 1.0
    top_k: int = 0  # 0: the model's top-k
    seed: int = 0
    # "exponential" only: probability that a token's expert at block b+1 follows from its expert
    # at block b (through a fixed per-block permutation) instead of being drawn afresh; models the
    # inter-layer routing dependency MoETuner exploits. 0: blocks independent.
    affinity: float = 0.0
    # Routing traces (always recorded by attention ranks): tokens per trace window.
    trace_window_tokens: int = 512


@dataclass
class KVCacheConfig:
    block_size: int = 16
    # Blocks per attention rank (each holds block_size tokens of every layer).
    num_blocks: int = 1024
    # "auto": the activations' dtype (model.compute_dtype). bfloat16 under fp32 compute halves
    # the cache; attention widens the gathered blocks, so it is not token-exact with fp32 KV.
    dtype: str = "auto"


@dataclass
class EngineConfig:
    # Continuous batching limits on each attention rank.
    max_running_requests: int = 64
    # Upper bound on tokens (prefill + decode) in one attention step.
    max_batch_tokens: int = 2048
    # Context limit; 0 means the model's max_position_embeddings.
    max_model_len: int = 0


@dataclass
class RuntimeConfig:
    # "auto": MPI between processes (NCCL when ranks hold GPUs), in-process for one process.
    transport: str = "auto"
    # "auto": each attention/expert rank takes a GPU (node-local rank modulo GPU count) when
    # CUDA is available, else the CPU; "cpu" forces the CPU.
    device: str = "auto"
    # Intra-op threads per rank process.
    threads_per_rank: int = 1
    # Threads of an attention rank's projections and LM head (the C linear kernel). 0: auto, the
    # node's cores over its attention ranks where one wave runs on CPU (attention and experts take
    # turns, engine/job.py attention_threads), else threads_per_rank.
    attention_threads: int = 0
    # "core": each attention/expert rank pins itself to one of the cores it may use, round-robin
    # in rank order over the node's compute ranks; the gateway (mostly asleep) is not pinned.
    # "none": the OS places them. Pins without regard to other jobs on the node, so it is off
    # by default. Needs threads_per_rank 1.
    cpu_bind: str = "none"
    # Longest sleep of an idle poll loop, in microseconds (back-off starts near zero).
    max_poll_sleep_us: int = 500
    # The same for the gateway (rank 0). It only admits requests and collects sampled tokens,
    # so it may sleep longer: every wake-up is CPU the compute ranks could use when ranks
    # share cores. Bounds the latency it adds to admission and to each token.
    gateway_poll_sleep_us: int = 2000
    # The launcher kills a job that has not finished after this many seconds (0 = no limit).
    job_timeout_s: float = 900.0
    # A serving gateway declares a rank that stops answering its heartbeats for this long hung,
    # fails the in-flight requests and aborts the job (which `amoe-serve up` restarts); 0 = off.
    heartbeat_timeout_s: float = 30.0


@dataclass
class LinkConfig:
    """The socket between HTTP ingress replicas and a data plane's gateway."""
    host: str = "127.0.0.1"       # interface the gateway binds (loopback by default)
    port: int = 0                 # 0: any free port (the gateway reports the one it got)
    token: Optional[str] = None   # shared secret; `amoe-serve up` generates one when unset
    model_name: str = "default"   # the name clients use for this data plane's model
    max_queued_requests: int = 256  # waiting (not yet placed) requests before answering 429
    max_frame_bytes: int = 1048576
    auth_timeout_s: float = 5.0


@dataclass
class ExtraModel:
    """Another model served by `amoe-serve up` beside the primary one: its own data plane."""
    name: str = "extra"
    path: str = ""
    config: Optional[str] = None        # a data-plane config file (default: the primary's)
    overrides: list[str] = field(default_factory=list)


@dataclass
class ServingConfig:
    # Where Ray Serve's HTTP proxy listens. Loopback by default: set "0.0.0.0" to expose it.
    host: str = "127.0.0.1"
    port: int = 8000
    # Accepted `Authorization: Bearer <key>` keys for /v1/*; empty = no authentication.
    # /health and /metrics stay open (load balancers and Prometheus scrape them).
    api_keys: list[str] = field(default_factory=list)
    # Longest prompt in tokens; 0 = the model's max_model_len - 1 (room for one new token).
    max_prompt_tokens: int = 0
    # Largest max_tokens a request may ask for; 0 = only bounded by max_model_len.
    max_tokens_limit: int = 4096
    # max_tokens of a /v1/completions request that does not set it (OpenAI's default is 16).
    default_max_tokens: int = 16
    # Generation requests in flight per ingress replica; more are answered 429 + Retry-After.
    max_concurrent_requests: int = 256
    # Seconds put in the Retry-After header of 429 answers the ingress itself decides.
    retry_after_s: float = 1.0
    # Largest request body (Content-Length and the bytes actually read).
    max_body_bytes: int = 4 * 1024 * 1024
    # Wall-clock limit of one generation request (0 = none): 504, or an SSE error event.
    request_timeout_s: float = 600.0
    # Most text stop strings per request.
    max_stop_strings: int = 16
    # Ingress replicas (Ray Serve deployment); each holds its own links to the gateways.
    num_replicas: int = 1
    # How long a replica keeps trying to connect its links at start-up before failing.
    connect_timeout_s: float = 60.0
    # Ray Serve route prefix of the ingress application.
    route_prefix: str = "/"
    # More models, each its own data-plane job, chosen by the request's `model`.
    extra_models: list[ExtraModel] = field(default_factory=list)
    # CPUs given to ray.init by the launcher (0 = os.cpu_count()); the ingress replicas take 0.
    ray_num_cpus: int = 0
    # Graceful shutdown (SIGTERM to `amoe-serve up` or to a data plane's mpiexec/gateway): new
    # requests get 503 at once, in-flight ones get this many seconds to finish, then whatever is
    # left is answered with an error and the data plane exits.
    drain_grace_s: float = 30.0


def validate_serving(cfg: ServingConfig) -> ServingConfig:
    if not (0 < cfg.port < 65536):
        raise ConfigError(f"serving.port={cfg.port}: expected 1..65535")
    if any(not isinstance(k, str) or not k for k in cfg.api_keys):
        raise ConfigError("serving.api_keys must be non-empty strings")
    for name in ("max_prompt_tokens", "max_tokens_limit"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"serving.{name} must be >= 0 (0 = the model's limit)")
    for name in ("default_max_tokens", "max_concurrent_requests", "max_body_bytes", "num_replicas",
                 "max_stop_strings"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"serving.{name} must be >= 1")
    if cfg.retry_after_s < 0 or cfg.request_timeout_s < 0 or cfg.connect_timeout_s < 0:
        raise ConfigError("serving.retry_after_s, request_timeout_s and connect_timeout_s must be >= 0")
    if cfg.ray_num_cpus < 0:
        raise ConfigError("serving.ray_num_cpus must be >= 0 (0 = all CPUs)")
    if cfg.drain_grace_s < 0:
        raise ConfigError("serving.drain_grace_s must be >= 0")
    if not cfg.route_prefix.startswith("/"):
        raise ConfigError(f"serving.route_prefix={cfg.route_prefix!r} must start with '/'")
    return cfg


@dataclass
class AmoeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    expert_buffer: ExpertBufferConfig = field(default_factory=ExpertBufferConfig)
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)


def validate(cfg: AmoeConfig) -> AmoeConfig:
    d = cfg.deployment
    if d.mode not in MODES:
        raise ConfigError(f"deployment.mode={d.mode!r}: expected one of {', '.join(MODES)}")
    if d.mode != "local":
        if d.attention_ranks < 1:
            raise ConfigError("deployment.attention_ranks must be >= 1")
        if d.expert_ranks < 1:
            raise ConfigError("deployment.expert_ranks must be >= 1")
    if cfg.scheduler.policy not in POLICIES:
        raise ConfigError(
            f"scheduler.policy={cfg.scheduler.policy!r}: expected one of {', '.join(POLICIES)}")
    if cfg.scheduler.expert_min_rows < 0 or cfg.scheduler.expert_max_wait_ms < 0:
        raise ConfigError("scheduler.expert_min_rows and expert_max_wait_ms must be >= 0")
    if cfg.scheduler.attention_waves < 0 or cfg.scheduler.attention_max_wait_ms < 0 or cfg.scheduler.min_wave_requests < 1:
        raise ConfigError("scheduler.attention_waves must be >= 0 (0 = auto), min_wave_requests >= 1, "
                          "attention_max_wait_ms >= 0")
    if cfg.scheduler.lookahead < 0 or not (0.0 < cfg.scheduler.decay <= 1.0):
        raise ConfigError("scheduler.lookahead must be >= 0 and 0 < scheduler.decay <= 1")
    if cfg.routing.mode not in ("model", "exponential"):
        raise ConfigError(f"routing.mode={cfg.routing.mode!r}: expected 'model' or 'exponential'")
    if cfg.routing.rate < 0 or cfg.routing.top_k < 0:
        raise ConfigError("routing.rate and routing.top_k must be >= 0")
    if cfg.routing.trace_window_tokens < 1:
        raise ConfigError("routing.trace_window_tokens must be >= 1")
    if not 0.0 <= cfg.routing.affinity <= 1.0:
        raise ConfigError(f"routing.affinity={cfg.routing.affinity}: expected 0 <= affinity <= 1")
    if cfg.expert_buffer.slots < 0:
        raise ConfigError(f"expert_buffer.slots={cfg.expert_buffer.slots}: expected >= 0 (0 = all resident)")
    if cfg.expert_buffer.eviction not in ("lifo", "lru", "fifo"):
        raise ConfigError(f"expert_buffer.eviction={cfg.expert_buffer.eviction!r}: expected lifo, lru or fifo")
    if cfg.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={cfg.model.dtype!r}: expected one of {', '.join(DTYPES)}")
    if cfg.model.compute_dtype not in DTYPES:
        raise ConfigError(f"model.compute_dtype={cfg.model.compute_dtype!r}: expected one of {', '.join(DTYPES)}")
    if cfg.model.compute_dtype not in ("auto", "float32") and cfg.model.dtype != cfg.model.compute_dtype:
        raise ConfigError(f"model.compute_dtype={cfg.model.compute_dtype!r} with model.dtype={cfg.model.dtype!r}: "
                          "compute can only be float32 over narrower weights, or the weights' own dtype")
    if cfg.kv_cache.dtype not in DTYPES:
        raise ConfigError(f"kv_cache.dtype={cfg.kv_cache.dtype!r}: expected one of {', '.join(DTYPES)}")
    if cfg.kv_cache.block_size < 1 or cfg.kv_cache.num_blocks < 1:
        raise ConfigError("kv_cache.block_size and kv_cache.num_blocks must be >= 1")
    if cfg.engine.max_running_requests < 1 or cfg.engine.max_batch_tokens < 1:
        raise ConfigError("engine.max_running_requests and engine.max_batch_tokens must be >= 1")
    if cfg.runtime.max_poll_sleep_us < 1 or cfg.runtime.gateway_poll_sleep_us < 1:
        raise ConfigError("runtime.max_poll_sleep_us and runtime.gateway_poll_sleep_us must be >= 1")
    if cfg.runtime.cpu_bind not in ("none", "core"):
        raise ConfigError(f"runtime.cpu_bind={cfg.runtime.cpu_bind!r}: expected 'none' or 'core'")
    if cfg.runtime.cpu_bind == "core" and cfg.runtime.threads_per_rank != 1:
        raise ConfigError(f"runtime.cpu_bind='core' binds a rank to one core; it cannot run "
                          f"runtime.threads_per_rank={cfg.runtime.threads_per_rank} threads")
    if cfg.runtime.attention_threads < 0 or cfg.runtime.threads_per_rank < 1:
        raise ConfigError("runtime.attention_threads must be >= 0 (0: auto) and runtime.threads_per_rank >= 1")
    if cfg.runtime.cpu_bind == "core" and cfg.runtime.attention_threads > 1:
        raise ConfigError(f"runtime.cpu_bind='core' binds a rank to one core; it cannot run "
                          f"runtime.attention_threads={cfg.runtime.attention_threads} threads")
    validate_serving(cfg.serving)
    return cfg


def merge_structured(schema: type, path: str | Path | Sequence[str | Path] | None, overrides: list[str] | None,
                     what: str):
    """Schema defaults, then the YAML file(s) in order (a later one wins), then dotlist
    overrides, as a dataclass instance; any problem becomes a one-line ConfigError naming `what`."""
    merged = OmegaConf.structured(schema)
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    try:
        for p in map(Path, paths):
            if not p.is_file():
                raise ConfigError(f"{what} file not found: {p}")
            merged = OmegaConf.merge(merged, OmegaConf.load(p))
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except Exception as e:  # OmegaConf's validation errors are precise but verbose
        raise ConfigError(f"invalid {what}: {e}".splitlines()[0]) from None


def load_config(path: str | Path | Sequence[str | Path] | None = None,
                overrides: list[str] | None = None) -> AmoeConfig:
    """Schema defaults, then the YAML file(s) in order (fragments such as
    ``configs/deployments/aep-2a-3e.yaml`` then ``configs/schedulers/mtfs.yaml`` compose), then
    dotlist overrides (``scheduler.policy=mtfs``)."""
    return validate(merge_structured(AmoeConfig, path, overrides, "configuration"))


def to_yaml(cfg: AmoeConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> AmoeConfig:
    merged = OmegaConf.merge(OmegaConf.structured(AmoeConfig), OmegaConf.create(text))
    return validate(OmegaConf.to_object(merged))  # type: ignore[arg-type]
