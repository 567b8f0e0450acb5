"""Calibrate the "local" device table on this machine with the real model code.

Expert FFN: `amoe_kernels.reference.expert_ffn` on the bench shape (hidden 1024, ffn 2816,
fp32, one thread) for a range of batch sizes -> `expert_points`. Attention: q/k/v/o projections
+ `amoe_serve.model.attention.causal_gqa_attention` per request + router, over batches of
decode tokens with varying context -> least-squares fit t = c0 + c_tok*tokens + c_ctx*context.
Messages: MPI latency / bandwidth measured by the transport team (defaults below) unless given.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .cost import DeviceTable

# Measured by the transport team on this machine (mpi4py, 50 us poll sleep): ~0.45 ms small-
# message round trip, ~1.8 GB/s for 4 MB messages.
MPI_LATENCY_S = 0.45e-3 / 2
MPI_BW = 1.8e9


def _time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def measure(hidden: int = 1024, ffn: int = 2816, num_heads: int = 16, num_kv_heads: int = 4,
            head_dim: int = 64, num_experts: int = 8, batches=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            threads: int = 1, quick: bool = False) -> dict:
    import torch
    from amoe_kernels.reference import expert_ffn
    from amoe_serve.model.attention import causal_gqa_attention
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(ffn, hidden, generator=g) * 0.02
    w3 = torch.randn(ffn, hidden, generator=g) * 0.02
    w2 = torch.randn(hidden, ffn, generator=g) * 0.02
    points = []
    for n in batches:
        x = torch.randn(n, hidden, generator=g)
        reps = 2 if quick else max(3, min(50, 2000 // n))
        points.append([int(n), _time(lambda: expert_ffn(x, w1, w3, w2), reps)])
    Hd, Gd = num_heads * head_dim, num_kv_heads * head_dim
    wq = torch.randn(Hd, hidden, generator=g) * 0.02
    wk = torch.randn(Gd, hidden, generator=g) * 0.02
    wv = torch.randn(Gd, hidden, generator=g) * 0.02
    wo = torch.randn(hidden, Hd, generator=g) * 0.02
    wr = torch.randn(num_experts, hidden, generator=g) * 0.02
    scale = head_dim ** -0.5
    rows = []
    combos = [(1, 64), (8, 64), (32, 128), (64, 128), (16, 512), (64, 256)]
    if quick:
        combos = combos[:4]
    for n, L in combos:
        x = torch.randn(n, hidden, generator=g)
        k = torch.randn(L, num_kv_heads, head_dim, generator=g)
        v = torch.randn(L, num_kv_heads, head_dim, generator=g)

        def step():
            q = torch.nn.functional.linear(x, wq).view(n, num_heads, head_dim)
            torch.nn.functional.linear(x, wk)
            torch.nn.functional.linear(x, wv)
            outs = [causal_gqa_attention(q[i:i + 1], k, v, L - 1, scale) for i in range(n)]
            o = torch.nn.functional.linear(torch.cat(outs), wo)
            torch.nn.functional.linear(o, wr)

        rows.append((n, n * L, _time(step, 2 if quick else 5)))
    A = np.array([[1.0, n, c] for n, c, _ in rows])
    y = np.array([t for _, _, t in rows])
    fit, *_ = np.linalg.lstsq(A, y, rcond=None)
    fit = [max(float(fit[0]), 0.0), max(float(fit[1]), 0.0), max(float(fit[2]), 0.0)]
    return {"expert_points": points, "attention_fit": fit,
            "attention_samples": [[int(n), int(c), float(t)] for n, c, t in rows]}


def local_table(measured: dict, cores: int | None = None, latency_s: float = MPI_LATENCY_S,
                bandwidth: float = MPI_BW) -> DeviceTable:
    import os
    return DeviceTable(
        name="local", peak_flops=0.0, mem_bw=0.0, memory_bytes=16e9,
        kernel_launch_s=0.0, step_overhead_s=0.0, sampler_s=0.0,
        intra_bw=bandwidth, intra_lat_s=latency_s, inter_bw=bandwidth, inter_lat_s=latency_s,
        gpus_per_node=64, cores=cores or (os.cpu_count() or 1),
        expert_points=measured["expert_points"], attention_fit=measured["attention_fit"],
        source="measured on this machine (amoe_serve.sim.calibrate); MPI from the transport team",
    )


def write_table(table: DeviceTable, path: str | Path) -> Path:
    from omegaconf import OmegaConf
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    d = asdict(table)
    header = ("# Local device table calibrated on this machine by `amoe-serve sim --calibrate`.\n"
              "# expert_points: [rows, seconds] of one expert FFN (fp32, 1 thread, hidden 1024, ffn 2816);\n"
              "# attention_fit: seconds = c0 + c_tok*tokens + c_ctx*sum(context) per attention step;\n"
              "# intra/inter: MPI message latency and bandwidth; cores: ranks computing at once.\n")
    p.write_text(header + OmegaConf.to_yaml(OmegaConf.create({"device": d})))
    return p


def calibrate(path: str | Path, quick: bool = False, cores: int | None = None) -> DeviceTable:
    t = local_table(measure(quick=quick), cores=cores)
    write_table(t, path)
    return t
