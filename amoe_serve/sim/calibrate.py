"""Calibrate the "local" device table on this machine.

With a checkpoint (`measure_engine`, what `amoe-serve sim --calibrate FILE --model CKPT` and the
bench use) the ranks' own code is timed, one thread (the attention side's C linear at
`attention_threads`, as the deployment resolves runtime.attention_threads), median of repetitions:
- expert step: `ExpertCore.receive` + `drain_block` of one expert with R rows -> `expert_points`;
- attention step of one block: `AttentionCore.attend` + `deliver` (norms, projections, paged
  attention, routing, dispatch and combine bookkeeping) on decode batches of varying size and
  context -> least-squares fit t = c0 + c_tok*tokens + c_ctx*sum(context) -> `attention_fit`;
- after the last block: `AttentionCore.sample` (final norm, LM head, greedy sampler, next
  embedding) -> fit t = c0 + c_row*rows -> `lm_head_fit`.
Messages: MPI latency / bandwidth measured by the transport team (defaults below) unless given.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .cost import DeviceTable
from amoe_serve.config import load_config
from amoe_serve.engine.job import make_attention_core, make_expert_core
from amoe_serve.model import load_spec
from amoe_serve.placement.layout import Placement
from amoe_serve.sampler import SamplingParams

# Measured by the transport team on this machine (mpi4py, 50 us poll sleep): ~0.45 ms small-
# message round trip, ~1.8 GB/s for 4 MB messages.
MPI_LATENCY_S = 0.45e-3 / 2
MPI_BW = 1.8e9


_SPREAD: list[float] = []   # coefficient of variation of each timed point (-> op_cv)


def _median(fn, reps: int, sync=None) -> float:
    """Median of single calls: robust to another process taking the core for a moment. `sync`
    (torch.cuda.synchronize on a GPU) makes each call's time its kernels' time."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        ts.append(time.perf_counter() - t0)
    a = np.asarray(ts)
    if a.size > 2 and a.mean() > 0:   # spread without the outliers a shared machine adds
        lo, hi = np.percentile(a, [10, 90])
        core = a[(a >= lo) & (a <= hi)]
        _SPREAD.append(float(core.std() / core.mean()) if core.size > 1 else 0.0)
    return float(np.median(ts))


def _fit(X: list[list[float]], y: list[float]) -> list[float]:
    coef, *_ = np.linalg.lstsq(np.asarray(X, dtype=np.float64), np.asarray(y), rcond=None)
    return [max(float(c), 0.0) for c in coef]


ATTN_COMBOS = ((1, 64), (8, 64), (16, 128), (32, 128), (64, 128), (32, 256), (64, 256))


def measure_engine(model_path: str, batches=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
                   combos=ATTN_COMBOS, threads: int = 1, quick: bool = False, device: str = "cpu",
                   dtype: str = "auto", attention_threads: int = 1) -> dict:
    """Time the attention and expert ranks' own code on a checkpoint (see the module docstring).

    Decode segments are made at the wanted position directly: the KV they attend to is
    whatever the cache holds, which costs the same as a real prefix.
    """
    import torch

    import amoe_kernels

    torch.set_num_threads(threads)
    # The expert FFN kernel is single-threaded: this reaches the attention steps and LM head only.
    amoe_kernels.set_linear_threads(attention_threads)
    try:
        return _measure(model_path, batches, combos, quick, device, dtype)
    finally:
        amoe_kernels.set_linear_threads(1)


def _measure(model_path, batches, combos, quick, device, dtype) -> dict:
    import torch

    spec = load_spec(model_path)
    NB, D = spec.num_blocks, spec.hidden_size
    steps = 2 if quick else 4
    # Contexts the model can hold (a small test checkpoint has few positions).
    combos = [(n, min(L, spec.max_position_embeddings - steps - 2)) for n, L in combos]
    kv_tokens = max(n * (L + steps + 2) for n, L in combos)
    cfg = load_config(None, [f"model.path={model_path}", "routing.mode=exponential", "routing.rate=0.5",
                             "routing.top_k=1", f"kv_cache.num_blocks={kv_tokens // 16 + 64}",
                             f"model.dtype={dtype}"])
    place = Placement.contiguous(NB, spec.num_experts, 1)
    core = make_attention_core(cfg, spec, place, device)
    experts = make_expert_core(cfg, spec, place.pairs_of(0), device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    _SPREAD.clear()
    g = torch.Generator().manual_seed(0)

    points = []
    # Each call takes the next (block, expert), as a serving rank does: the same expert again
    # would find its weights still in the CPU cache.
    keys = itertools.cycle([(b, e) for b in range(NB) for e in range(spec.num_experts)])
    for n in batches:
        meta_R3 = torch.zeros(n, 3, dtype=torch.int32, device=device)
        y_RD = torch.randn(n, D, generator=g, dtype=core.model.dtype).to(device)

        def expert_step():
            b, e = next(keys)
            experts.receive(1, {"b": b, "experts": [e], "counts": [n]}, meta_R3, y_RD)
            experts.drain_block(b)
        reps = 3 if quick else max(8, min(40, 1500 // n))
        points.append([int(n), _median(expert_step, reps, sync)])

    attn_rows, lm_rows = [], []
    params = SamplingParams(max_tokens=steps + 2, ignore_eos=True)
    for i, (n, L) in enumerate(combos):
        # n requests whose prompts of L tokens are cached: one decode segment at position L.
        seg = core.merge([core.admit(f"cal-{i}-{j}", [3] * L, params) for j in range(n)])
        seg.x_TD = torch.randn(n, D, generator=g, dtype=core.model.dtype).to(device)
        seg.start_S, seg.n_S, seg.paged = [L] * n, [1] * n, None
        segs = [seg]
        for step in range(steps):
            ctx = sum(p + n_ for s in segs for p, n_ in zip(s.start_S, s.n_S))
            t_blocks = []
            for b in range(NB):
                t0 = time.perf_counter()
                sends = core.attend(b, segs)
                if sync is not None:
                    sync()
                t_att = time.perf_counter() - t0
                for d in sends:
                    experts.receive(1, d.header, *d.tensors)
                replies = experts.drain_block(b)
                t0 = time.perf_counter()
                done = []
                for r in replies:
                    done.extend(core.deliver(b, *r.tensors))
                if sync is not None:
                    sync()
                t_blocks.append(t_att + time.perf_counter() - t0)
                segs = done
            t0 = time.perf_counter()
            _, segs = core.sample(segs)
            if sync is not None:
                sync()
            t_lm = time.perf_counter() - t0
            if step > 0:  # the first pass warms caches and allocators up
                attn_rows.append((n, ctx, float(np.median(t_blocks))))
                lm_rows.append((n, t_lm))
        core.fail_all("calibration done")
    return {"expert_points": points,
            "attention_fit": _fit([[1.0, n, c] for n, c, _ in attn_rows], [t for *_, t in attn_rows]),
            "lm_head_fit": _fit([[1.0, n] for n, _ in lm_rows], [t for _, t in lm_rows]),
            "attention_samples": [[int(n), int(c), t] for n, c, t in attn_rows],
            "lm_head_samples": [[int(n), t] for n, t in lm_rows],
            "op_cv": float(np.median(_SPREAD)) if _SPREAD else -1.0}


def local_table(measured: dict, cores: int | None = None, latency_s: float = MPI_LATENCY_S,
                bandwidth: float = MPI_BW, source: str = "measured on this machine") -> DeviceTable:
    import os
    return DeviceTable(
        name="local", peak_flops=0.0, mem_bw=0.0, memory_bytes=16e9,
        kernel_launch_s=0.0, step_overhead_s=0.0, sampler_s=0.0,
        intra_bw=bandwidth, intra_lat_s=latency_s, inter_bw=bandwidth, inter_lat_s=latency_s,
        gpus_per_node=64, cores=cores or (os.cpu_count() or 1),
        expert_points=measured["expert_points"], attention_fit=measured["attention_fit"],
        lm_head_fit=measured.get("lm_head_fit", []),
        source=source,
    )


def write_table(table: DeviceTable, path: str | Path) -> Path:
    from omegaconf import OmegaConf
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    d = asdict(table)
    header = ("# Local device table calibrated on this machine by `amoe-serve sim --calibrate`.\n"
              "# expert_points: [rows, seconds] of one expert step (receive, FFN, reply; 1 thread);\n"
              "# attention_fit: seconds = c0 + c_tok*tokens + c_ctx*sum(context) per attention step;\n"
              "# lm_head_fit: seconds = c0 + c_row*rows after the last block (LM head, sampler, embedding);\n"
              "# intra/inter: MPI message latency and bandwidth; cores: ranks computing at once.\n")
    p.write_text(header + OmegaConf.to_yaml(OmegaConf.create({"device": d})))
    return p


def calibrate(path: str | Path, model_path: str, quick: bool = False, cores: int | None = None,
              attention_threads: int = 1) -> DeviceTable:
    t = local_table(measure_engine(model_path, quick=quick, attention_threads=attention_threads), cores=cores,
                    source=f"measured on this machine with the ranks' code on {Path(model_path).name} "
                           f"(amoe_serve.sim.calibrate, attention linear at {attention_threads} thread(s)); "
                           "MPI from the transport team")
    write_table(t, path)
    return t
