"""Micro-benchmarks: each Triton kernel against its PyTorch reference on the same CUDA tensors.

    python -m amoe_kernels.bench                     # all ops, bf16
    python -m amoe_kernels.bench --op paged_decode_attention --dtype float16

Reports time per call (ms), achieved bandwidth (GB/s, bytes that must move at least once) and
FLOP rate (TFLOP/s, for the GEMM/attention ops) of both. Without a GPU it says so and exits 0.
`--interpret-smoke` runs the same code on tiny CPU shapes under TRITON_INTERPRET=1 (tests use it
to keep this script working; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import dispatch

OPS = ("grouped_expert_ffn", "topk_gating", "route", "permute", "permute_tokens", "unpermute_combine",
       "paged_decode_attention")


@dataclass
class Case:
    op: str
    shape: str
    run_triton: Callable[[], object]
    run_ref: Callable[[], object]
    bytes: int
    flops: int = 0


def _uneven_counts(R: int, G: int, gen: torch.Generator) -> list[int]:
    ids = torch.randint(0, G, (R,), generator=gen)
    counts = torch.bincount(ids, minlength=G)
    counts[G // 2] += counts[0]  # at least one empty expert
    counts[0] = 0
    return counts.tolist()


def cases(dev: torch.device, dtype: torch.dtype, small: bool) -> list[Case]:
    gen = torch.Generator().manual_seed(0)
    es = dtype.itemsize if hasattr(dtype, "itemsize") else torch.finfo(dtype).bits // 8
    out: list[Case] = []

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(dev)

    def both(op, *args, **kw):
        fn = getattr(dispatch, op)
        return (lambda: fn(*args, backend="triton", **kw)), (lambda: fn(*args, backend="reference", **kw))

    # grouped expert FFN (Mixtral-like block: 8 experts, D=4096, F=14336)
    G, D, F = (4, 64, 48) if small else (8, 4096, 14336)
    w1, w3, w2 = rnd(G, F, D, scale=D**-0.5), rnd(G, F, D, scale=D**-0.5), rnd(G, D, F, scale=F**-0.5)
    for R in ((5, 37) if small else (16, 256, 4096)):
        counts = _uneven_counts(R, G, gen)
        x = rnd(R, D)
        busy = sum(1 for c in counts if c)
        t, r = both("grouped_expert_ffn", x, counts, w1, w3, w2)
        out.append(Case("grouped_expert_ffn", f"R={R} G={G} D={D} F={F}", t, r,
                        bytes=(3 * busy * F * D + 2 * R * D + 2 * R * F) * es, flops=6 * R * D * F))

    # gating / routing / permute
    for T, E, k in (((9, 8, 2), (33, 16, 4)) if small else ((64, 8, 2), (4096, 8, 2), (64, 64, 8), (4096, 64, 8))):
        logits = rnd(T, E)
        t, r = both("topk_gating", logits, k, True)
        out.append(Case("topk_gating", f"T={T} E={E} k={k}", t, r, bytes=T * E * es + T * k * 12))
        t, r = both("route", logits, k, True, E)
        out.append(Case("route", f"T={T} E={E} k={k}", t, r, bytes=T * E * es + T * k * 20 + E * 8))
        ids = torch.randint(0, E, (T, k), generator=gen).to(dev)
        t, r = both("permute", ids, E)
        out.append(Case("permute", f"T={T} E={E} k={k}", t, r, bytes=T * k * 16 + E * 8))

    # permute tokens / unpermute-combine
    Dm = 64 if small else 4096
    for T, k in (((7, 2),) if small else ((64, 8), (4096, 2), (4096, 8))):
        x = rnd(T, Dm)
        order = torch.randperm(T * k, generator=gen).to(dev)
        t, r = both("permute_tokens", x, order, k)
        out.append(Case("permute_tokens", f"T={T} k={k} D={Dm}", t, r, bytes=2 * T * k * Dm * es + T * k * 8))
        ys = rnd(T * k, Dm)
        w = torch.rand(T, k, generator=gen).to(dev)
        t, r = both("unpermute_combine", ys, order, w)
        out.append(Case("unpermute_combine", f"T={T} k={k} D={Dm}", t, r,
                        bytes=(T * k + T) * Dm * es + T * k * 12, flops=2 * T * k * Dm))

    # paged decode attention (Llama/Mixtral-like heads; uneven lengths)
    H, Gk, d, S = (4, 2, 16, 4) if small else (32, 8, 128, 16)
    for B, Lmax in (((3, 20),) if small else ((8, 4096), (64, 512), (64, 4096), (256, 1024))):
        lens = torch.randint(1, Lmax + 1, (B,), generator=gen).tolist()
        lens[0] = Lmax
        nblk = sum(-(-L // S) for L in lens)
        kc, vc = rnd(nblk, S, Gk, d), rnd(nblk, S, Gk, d)
        perm = torch.randperm(nblk, generator=gen).tolist()
        tables, at = [], 0
        for L in lens:
            n = -(-L // S)
            tables.append(perm[at : at + n])
            at += n
        q = rnd(B, H, d)
        t, r = both("paged_decode_attention", q, kc, vc, tables, lens, d**-0.5)
        tot = sum(lens)
        out.append(Case("paged_decode_attention", f"B={B} Lmax={Lmax} sumL={tot} H={H} G={Gk} d={d}", t, r,
                        bytes=2 * tot * Gk * d * es + 2 * B * H * d * es, flops=4 * tot * H * d))
    return out


def _time_ms(fn, cuda: bool) -> float:
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m amoe_kernels.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--op", choices=OPS, action="append", help="benchmark only this op (repeatable)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--interpret-smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.interpret_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--interpret-smoke needs TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        dev, dtype, cuda = torch.device("cpu"), torch.float16 if args.dtype == "bfloat16" else getattr(torch, args.dtype), False
    else:
        if not torch.cuda.is_available():
            print("no GPU present: amoe_kernels.bench times the Triton kernels on a CUDA device; nothing to do.")
            return 0
        if not dispatch.triton_available():
            print("triton does not import: install amoe-serve[gpu] to benchmark the kernels.")
            return 0
        dev, dtype, cuda = torch.device("cuda"), getattr(torch, args.dtype), True

    name = torch.cuda.get_device_name(dev) if cuda else "CPU (Triton interpreter; timings meaningless)"
    print(f"device: {name}   dtype: {dtype}")
    hdr = f"{'op':<24} {'shape':<44} {'triton ms':>10} {'ref ms':>10} {'speedup':>8} {'tri GB/s':>9} {'ref GB/s':>9} {'tri TF/s':>9} {'ref TF/s':>9}"
    print(hdr)
    print("-" * len(hdr))
    with torch.inference_mode():
        for c in cases(dev, dtype, small=not cuda):
            if args.op and c.op not in args.op:
                continue
            tt, tr = _time_ms(c.run_triton, cuda), _time_ms(c.run_ref, cuda)
            gbs = lambda ms: c.bytes / (ms * 1e-3) / 1e9  # noqa: E731
            tfs = lambda ms: c.flops / (ms * 1e-3) / 1e12 if c.flops else float("nan")  # noqa: E731
            print(f"{c.op:<24} {c.shape:<44} {tt:>10.4f} {tr:>10.4f} {tr / tt:>7.2f}x "
                  f"{gbs(tt):>9.1f} {gbs(tr):>9.1f} {tfs(tt):>9.2f} {tfs(tr):>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
