"""One simulated point: a system on a cluster size at one setting (`run_one`), and the device
table the config asks for. `run.py` sweeps these; `goodput.py` searches them."""
from __future__ import annotations

import time
from pathlib import Path

from amoe_serve.config import ConfigError

from .aep import simulate_aep
from .sim_config import SimConfig, lengths
from .cost import CostModel, DeviceTable, load_table
from .lockstep import simulate_lockstep
from .noise import NoiseConfig
from .params import SimParams
from .placement import experts_per_rank, make_placement
from .workload import Workload, make_workload, popularity


def split_gpus(gpus: int, attention_fraction: float) -> tuple[int, int]:
    a = max(1, min(gpus - 1, int(round(gpus * attention_fraction))))
    return a, gpus - a


def _table(cfg: SimConfig) -> DeviceTable:
    t = load_table(cfg.cluster.device)
    if cfg.cluster.gpus_per_node:
        t.gpus_per_node = cfg.cluster.gpus_per_node
    if cfg.cluster.cores:
        t.cores = cfg.cluster.cores
    if cfg.cluster.host:
        apply_host(t, cfg.cluster.host)
    return t


def apply_host(t: DeviceTable, path: str) -> None:
    """Measured host costs (a YAML with a `host:` mapping of DeviceTable fields) replace the table's."""
    if path == "zero":   # ablation: no host cost at all (what the measured figure limits)
        t.attn_step_overhead_s = t.expert_step_overhead_s = t.step_overhead_s = 0.0
        t.msg_send_s = t.msg_recv_s = 0.0
        t.source += "; host costs set to 0"
        return
    from omegaconf import OmegaConf
    data = OmegaConf.to_container(OmegaConf.load(path))
    host = data.get("host", data)
    for k, v in host.items():
        if k not in ("attn_step_overhead_s", "expert_step_overhead_s", "msg_send_s", "msg_recv_s",
                     "step_overhead_s"):
            raise ConfigError(f"host costs {path}: unknown key {k!r}")
        setattr(t, k, float(v))
    t.source += f"; host costs from {Path(path).name}"


def _params(cfg: SimConfig, max_running: int, policy: str, kv_tokens: float,
            waves: int | None = None, max_wait_ms: float | None = None,
            expert_min_rows: int | None = None) -> SimParams:
    m, w, r = cfg.model, cfg.workload, cfg.run
    return SimParams(num_blocks=m.num_blocks, num_experts=m.num_experts, top_k=m.top_k,
                     max_running=max_running, max_batch_tokens=r.max_batch_tokens,
                     max_expert_batch=r.max_expert_batch, group_block=r.group_block, policy=policy,
                     lookahead=r.lookahead, decay=r.decay, skew_rate=w.skew_rate,
                     hot_per_block=w.hot_expert_per_block, seed=w.seed, duration_s=w.duration_s,
                     warmup_s=w.warmup_s, kv_tokens=kv_tokens,
                     warm_start=w.warm_start and w.arrival == "offline",
                     attention_waves=r.attention_waves if waves is None else waves,
                     attention_max_wait_s=(r.attention_max_wait_ms if max_wait_ms is None else max_wait_ms) * 1e-3,
                     min_wave_requests=r.min_wave_requests,
                     expert_min_rows=r.expert_min_rows if expert_min_rows is None else expert_min_rows,
                     expert_max_wait_s=r.expert_max_wait_ms * 1e-3)


def _kv_tokens(cost: CostModel, table: DeviceTable, experts_per_gpu: float, attention: bool) -> float:
    free = table.memory_bytes - cost.expert_weight_bytes(experts_per_gpu)
    if attention:
        free -= cost.attention_weight_bytes()
    if free <= 0:
        raise ConfigError(f"model weights do not fit in {table.name} memory ({table.memory_bytes / 1e9:.0f} GB)")
    return 0.9 * free / cost.kv_bytes_per_token()


def _noise(cfg: SimConfig) -> NoiseConfig:
    n = cfg.noise
    return NoiseConfig(cv=n.cv, slow_gpus=list(n.slow_gpus), slow_factor=n.slow_factor, seed=cfg.workload.seed)


def run_one(cfg: SimConfig, system: str, gpus: int, *, policy: str = "defrag", max_running: int,
            rate_per_gpu: float | None = None, table: DeviceTable | None = None,
            waves: int | None = None, workload: Workload | None = None, attention_fraction: float | None = None,
            replicas: int = 0, max_wait_ms: float | None = None, expert_min_rows: int | None = None) -> dict:
    """Simulate one (system, cluster size, split, replicas, waves, batch limit, load) point; returns
    a result record. workload: these exact requests (e.g. a bench run's) instead of drawn ones."""
    table = table or _table(cfg)
    cost = CostModel(table, cfg.model)
    w = cfg.workload
    pin, pout = lengths(w)
    rate = (rate_per_gpu or 1.0) * gpus
    wl = workload or make_workload(w.num_requests, pin, pout, w.arrival, rate, w.seed)
    m = cfg.model
    E = m.num_experts
    layout = cfg.run.lockstep_layout
    frac = cfg.cluster.attention_fraction if attention_fraction is None else attention_fraction
    t0 = time.perf_counter()
    if system == "aep" or layout == "split":
        A, X = split_gpus(gpus, frac)
    else:
        A = X = gpus
    p_BE = popularity(E, w.skew_rate, m.num_blocks, w.hot_expert_per_block, w.seed)
    place = make_placement(cfg.run.placement, p_BE, X, replicas)
    noise = _noise(cfg)
    if system == "aep":
        kv = _kv_tokens(cost, table, 0, True)
        p = _params(cfg, max_running, policy, kv, waves, max_wait_ms, expert_min_rows)
        waves = p.attention_waves
        st = simulate_aep(cost, wl, p, A, X, table.cores, table.gpus_per_node, placement=place, noise=noise)
    else:
        colocated = layout == "colocated"
        kv = _kv_tokens(cost, table, experts_per_rank(place) if colocated else 0, True)
        p = _params(cfg, max_running, "-", kv)
        # Lockstep emits tokens in whole-iteration bursts; it is cheap to simulate, so a longer
        # window keeps its throughput estimate from being quantized to whole iterations.
        p.duration_s *= cfg.run.lockstep_window_scale
        p.warmup_s *= cfg.run.lockstep_window_scale
        st = simulate_lockstep(cost, wl, p, A, X, colocated, table.cores, table.gpus_per_node,
                               placement=place, noise=noise)
        policy = "lockstep"
        waves = None
    rec = {
        "gpus": gpus, "attention_gpus": A, "expert_gpus": X, "system": system, "policy": policy,
        "layout": "disaggregated" if system == "aep" else layout,
        "workload": w.name, "arrival": w.arrival,
        "request_rate": rate if w.arrival == "poisson" else None,
        "max_running_requests": max_running, "attention_waves": waves, "device": table.name,
        "expert_min_rows": p.expert_min_rows if system == "aep" else None,
        "top_k": m.top_k, "num_experts": E, "skew_rate": w.skew_rate, "model": m.name,
        "placement": cfg.run.placement, "replicas": replicas, "noise_cv": cfg.noise.cv,
        "slow_gpus": list(cfg.noise.slow_gpus), "slow_factor": cfg.noise.slow_factor,
    }
    rec.update(st.summary())
    rec["tokens_per_s_per_gpu"] = rec["tokens_per_s"] / gpus
    rec["expert_load_share"] = [round(float(x), 4) for x in
                                (st.expert_rows.sum(axis=0) / max(st.expert_rows.sum(), 1))]
    rec["wall_s"] = round(time.perf_counter() - t0, 3)
    return rec

