"""Builds one rank of a data-plane job from the config and runs it.

The same function serves an MPI process (rank_main) and a thread of an in-process job
(tests, debugging), because everything it needs arrives as arguments.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Optional

import torch

import amoe_kernels
from amoe_serve.config import AmoeConfig
from amoe_serve.engine.admission import Limits
from amoe_serve.engine.attention_core import AttentionCore
from amoe_serve.engine.attention_rank import AttentionRank
from amoe_serve.engine.expert_core import ExpertCore
from amoe_serve.sched.expert_plan import ExpertGate
from amoe_serve.engine.expert_rank import ExpertRank
from amoe_serve.engine.gateway import Gateway
from amoe_serve.placement.layout import Placement
from amoe_serve.engine.headers import FatalHeader
from amoe_serve.engine.tags import GATEWAY_RANK, Tag
from amoe_serve.engine.skew import ExponentialSkew
from amoe_serve.engine.topology import Topology
from amoe_serve.kv.allocator import BlockAllocator
from amoe_serve.kv.cache import PagedKVCache
from amoe_serve.model import AttentionSide, ExpertSide, ModelSpec, load_spec
from amoe_serve.procs import cores_available, ranks_on_this_node
from amoe_serve.sched.policies import make_scheduler
from amoe_serve.sched.waves import auto_waves
from amoe_transport import Transport
from amoe_serve.model.expert_buffer import BufferedExpertSide
from amoe_serve.sampler.grammar import backend_for

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(cfg: AmoeConfig) -> Optional[torch.dtype]:
    return DTYPES[cfg.model.dtype]


def compute_dtype(cfg: AmoeConfig) -> Optional[torch.dtype]:
    """None: compute in the weights' dtype."""
    return DTYPES[cfg.model.compute_dtype]


def topology(cfg: AmoeConfig) -> Topology:
    return Topology(cfg.deployment.attention_ranks, cfg.deployment.expert_ranks)


def placement(cfg: AmoeConfig, spec: ModelSpec) -> Placement:
    E = cfg.deployment.expert_ranks
    if cfg.deployment.placement:
        return Placement.from_file(cfg.deployment.placement, spec.num_blocks, spec.num_experts, E)
    return Placement.contiguous(spec.num_blocks, spec.num_experts, E)


def limits(cfg: AmoeConfig, spec: ModelSpec) -> Limits:
    max_len = cfg.engine.max_model_len or spec.max_position_embeddings
    return Limits(max_len, cfg.kv_cache.block_size, cfg.kv_cache.num_blocks, cfg.engine.max_running_requests)


def pick_device(cfg: AmoeConfig, local_rank: int) -> str:
    """The device a worker rank computes on: a GPU by node-local rank when there are GPUs."""
    if cfg.runtime.device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{local_rank % torch.cuda.device_count()}"


def make_attention_core(cfg: AmoeConfig, spec: ModelSpec, place: Placement, device: str = "cpu",
                        rank: int = 0) -> AttentionCore:
    model = AttentionSide.load(cfg.model.path, torch_dtype(cfg), device, compute_dtype(cfg))
    kv_dtype = DTYPES[cfg.kv_cache.dtype] or model.dtype
    kv = PagedKVCache(spec, cfg.kv_cache.num_blocks, cfg.kv_cache.block_size, kv_dtype, device)
    alloc = BlockAllocator(cfg.kv_cache.num_blocks, cfg.kv_cache.block_size)
    r = cfg.routing
    skew = None
    if r.mode == "exponential":
        # Draws seeded by rank too: data-parallel attention ranks must not draw identical sequences.
        skew = ExponentialSkew(spec.num_blocks, spec.num_experts, r.top_k or spec.top_k, r.rate, r.seed,
                               r.affinity, stream=rank)
    def grammar():
        return backend_for(cfg.model.path, spec.vocab_size, spec.eos_token_ids)

    return AttentionCore(model, place, kv, alloc, spec.eos_token_ids, skew, r.trace_window_tokens, grammar)


def make_expert_core(cfg: AmoeConfig, spec: ModelSpec, pairs: list[tuple[int, int]],
                     device: str = "cpu") -> ExpertCore:
    eb = cfg.expert_buffer
    if eb.slots > 0:  # Expert Buffering: only eb.slots experts resident, the rest read on demand
        experts = BufferedExpertSide.load(cfg.model.path, spec, torch_dtype(cfg), pairs, eb.slots, eb.eviction,
                                          device, eb.prefetch, eb.record_accesses, compute_dtype(cfg))
    else:
        experts = ExpertSide.load(cfg.model.path, spec, torch_dtype(cfg), pairs, device, compute_dtype(cfg))
    s = cfg.scheduler
    sched = make_scheduler(s.policy, s.lookahead, s.decay)
    gate = ExpertGate(spec.num_blocks, s.expert_min_rows, s.expert_max_wait_ms * 1e-3)
    return ExpertCore(experts, pairs, spec.num_blocks, sched, s.max_expert_batch, s.group_block, gate=gate)


def attention_waves(cfg: AmoeConfig, device: str = "cpu") -> int:
    """scheduler.attention_waves, with 0 resolved for the node this process runs on (the
    gateway, rank 0, mostly sleeps: it is not counted where the whole job is on one node)."""
    if cfg.scheduler.attention_waves:
        return cfg.scheduler.attention_waves
    world = topology(cfg).world_size
    here = ranks_on_this_node(world)
    compute = here - 1 if here >= world else here
    return auto_waves(device == "cpu", compute, cfg.runtime.threads_per_rank, cores_available())


def attention_threads(cfg: AmoeConfig, waves: int, device: str = "cpu") -> int:
    """runtime.attention_threads, 0 resolved: with one wave on CPU (lockstep, or AEP where the
    compute ranks share cores) a block's attention and its experts run one after the other, so
    while an attention rank works its expert ranks wait on the cores it could use: the node's
    cores, shared among the attention ranks there. Otherwise (two waves, GPUs, ranks pinned to a
    core, a job over several nodes) threads_per_rank."""
    rt = cfg.runtime
    if rt.attention_threads:
        return rt.attention_threads
    topo = topology(cfg)
    if device != "cpu" or waves != 1 or rt.cpu_bind == "core" or ranks_on_this_node(topo.world_size) < topo.world_size:
        return rt.threads_per_rank
    return max(rt.threads_per_rank, cores_available() // topo.attention_ranks)


def run_worker(cfg: AmoeConfig, transport: Transport, device: str = "cpu") -> None:
    """Run an attention or expert rank until the gateway says SHUTDOWN; report counters."""
    topo = topology(cfg)
    rank = transport.rank
    role = topo.role(rank)
    spec = load_spec(cfg.model.path)
    place = placement(cfg, spec)
    sleep = cfg.runtime.max_poll_sleep_us * 1e-6
    lockstep = cfg.deployment.mode == "lockstep"
    if role == "attention":
        s = cfg.scheduler
        waves = 1 if lockstep else attention_waves(cfg, device)
        # The projections' and LM head's C kernel only: torch's own pool stays at threads_per_rank
        # (its idle OpenMP workers spin on the cores the expert ranks need next).
        amoe_kernels.set_linear_threads(attention_threads(cfg, waves, device))
        r = AttentionRank(make_attention_core(cfg, spec, place, device, rank), transport, topo,
                          make_scheduler(s.policy, s.lookahead, s.decay), cfg.engine.max_batch_tokens, sleep,
                          s.attention_max_wait_ms * 1e-3, waves, s.min_wave_requests)
        r.run_lockstep() if lockstep else r.run_aep()
    elif role == "expert":
        core = make_expert_core(cfg, spec, place.pairs_of(rank - 1 - topo.attention_ranks), device)
        r = ExpertRank(core, transport, topo, spec.hidden_size, core.experts.dtype, sleep, device)
        r.run_lockstep() if lockstep else r.run_aep()
    else:
        raise ValueError(f"rank {rank} is the gateway, not a worker")
    final = r.stats()
    final["cpus"] = sorted(os.sched_getaffinity(0))  # the cores this rank ran on (cpu_bind)
    if role == "attention":  # the routing trace goes with the final report only (it can be large)
        final["trace"] = r.core.trace.snapshot().to_dict()
    transport.isend(GATEWAY_RANK, Tag.STATS, final)
    transport.flush(timeout=10)


def report_fatal(transport: Transport, topo: Topology, exc: BaseException) -> str:
    """Tell the gateway why this rank is going down; returns the message printed."""
    role = topo.role(transport.rank) if transport.rank < topo.world_size else "?"
    msg = f"{type(exc).__name__}: {exc}"
    try:
        transport.isend(GATEWAY_RANK, Tag.FATAL, FatalHeader(transport.rank, role, msg).encode())
        transport.flush(timeout=2)
    except Exception:
        pass
    return f"[amoe-serve] rank {transport.rank} ({role}) failed: {msg}"


def make_gateway(cfg: AmoeConfig, transport: Transport, spec: ModelSpec, **kw) -> Gateway:
    return Gateway(transport, topology(cfg), limits(cfg, spec), cfg.runtime.gateway_poll_sleep_us * 1e-6, **kw)


def print_fatal(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
    traceback.print_exc(file=sys.stderr)
