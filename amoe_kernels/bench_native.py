"""Micro-benchmark of the native CPU kernels under the data plane's GEMMs: the C linear (the
attention side's projections and LM head) and the grouped expert FFN, fp32, one thread.

    python -m amoe_kernels.bench_native                  # the bench model's shapes
    python -m amoe_kernels.bench_native --small          # tiny shapes (tests keep it working)

Weights are cycled over more than the L3 holds, as a rank's are over its blocks, so each call
reads them from memory. Reports the best time per call and its GFLOP/s; run it from two
checkouts to compare kernel versions (docs/bench/overhead/README.md, eleventh round).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import native

COLD_BYTES = 64 << 20  # more than the 16 MB L3 here, as a rank's weights over its blocks are

# (rows, outputs, inputs): the bench model's LM head, QKV and O projections, an expert's halves.
LINEAR_SHAPES = [(64, 32000, 1024), (64, 1536, 1024), (64, 1024, 1024), (16, 2816, 1024),
                 (16, 1024, 2816), (8, 2816, 1024), (3, 1024, 1024)]
FFN_ROWS = [2, 8, 16, 32]  # rows per expert, 8 experts of D x F
FFN_SHAPE = (1024, 2816)
SMALL_LINEAR = [(8, 64, 32), (3, 32, 64)]
SMALL_FFN = (32, 64)


def _copies(nbytes: int, cold: bool) -> int:
    return max(1, COLD_BYTES // max(1, nbytes) + 1) if cold else 1


def _best(fn, reps: int) -> float:
    best = float("inf")
    for i in range(reps):
        t0 = time.perf_counter()
        fn(i)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_linear(shapes, reps: int, cold: bool) -> list[str]:
    out = []
    gen = torch.Generator().manual_seed(0)
    for T, O, D in shapes:
        C = _copies(O * D * 4, cold)
        w = torch.rand(C, O, D, generator=gen) - 0.5
        x = torch.rand(T, D, generator=gen) - 0.5
        s = _best(lambda i: native.linear(x, w[i % C]), reps)
        out.append(f"linear {T} x {D} -> {O}: {s * 1e3:.3f} ms, {2 * T * O * D / s / 1e9:.1f} GFLOP/s")
    return out


def bench_ffn(rows_list, shape, reps: int, cold: bool) -> list[str]:
    out = []
    D, F = shape
    E = 8 * min(4, _copies(8 * 3 * D * F * 4, cold))  # 8 experts per call, cycled over sets
    gen = torch.Generator().manual_seed(0)
    w1, w3 = (torch.rand(E, F, D, generator=gen) - 0.5) * 0.05, (torch.rand(E, F, D, generator=gen) - 0.5) * 0.05
    w2 = (torch.rand(E, D, F, generator=gen) - 0.5) * 0.05
    for rows in rows_list:
        x = torch.rand(8 * rows, D, generator=gen) - 0.5
        sets = E // 8
        s = _best(lambda i: native.grouped_swiglu(x, [rows] * 8, w1, w3, w2, list(range(8 * (i % sets), 8 * (i % sets) + 8))),
                  reps)
        out.append(f"expert FFN 8 x ({D} x {F}), {rows} rows each: {s * 1e3:.3f} ms, "
                   f"{2 * 8 * rows * 3 * D * F / s / 1e9:.1f} GFLOP/s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m amoe_kernels.bench_native", description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes, a few calls (a smoke run)")
    ap.add_argument("--reps", type=int, default=0, help="calls per shape (default: 20, 3 with --small)")
    args = ap.parse_args(argv)
    if not native.available():
        print(f"native kernels unavailable: {native.unavailable_reason()}")
        return 0
    reps = args.reps or (3 if args.small else 20)
    native.set_linear_threads(1)
    if args.small:
        lines = bench_linear(SMALL_LINEAR, reps, cold=False) + bench_ffn([1, 3], SMALL_FFN, reps, cold=False)
    else:
        lines = bench_linear(LINEAR_SHAPES, reps, cold=True) + bench_ffn(FFN_ROWS, FFN_SHAPE, reps, cold=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
