"""Per operator, at OLMoE-1B-7B's shapes: fp32 weights, bf16 weights with bf16 compute (torch's
native CPU path), bf16 at rest widened per call to fp32 (upcast.py: amoe_kernels.linear), and,
for the experts, bf16 widened in registers by the C kernel (native.grouped_swiglu, what
amoe_kernels.grouped_expert_ffn runs when it builds). One thread, as each rank has about one
core here; best of 5 repeats.

    python -m amoe_kernels.bench_dtype [--threads N] [--rows 1,8,64] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as Fn

from . import dispatch, native, upcast

OPS = {  # name -> (out features, in features): OLMoE-1B-7B
    "qkv_proj": (3 * 2048, 2048),
    "o_proj": (2048, 2048),
    "lm_head": (50304, 2048),
}
EXPERT = (1024, 2048)  # F, D of one expert


def _time(fn, reps: int = 5, inner: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best * 1e3


def measure(rows: list[int]) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for name, (O, D) in OPS.items():
        w32 = torch.randn(O, D, generator=g) * 0.02
        w16 = w32.bfloat16()
        for T in rows:
            x = torch.randn(T, D, generator=g)
            out.append({"op": name, "rows": T,
                        "fp32_ms": _time(lambda: Fn.linear(x, w32)),
                        "bf16_native_ms": _time(lambda: Fn.linear(x.bfloat16(), w16)),
                        "bf16_widened_ms": _time(lambda: dispatch.linear(x, w16)), "bf16_in_registers_ms": None})
    F, D = EXPERT
    E = 8  # a step's experts on one rank, rows split evenly
    w = [torch.randn(E, F, D, generator=g) * 0.02, torch.randn(E, F, D, generator=g) * 0.02,
         torch.randn(E, D, F, generator=g) * 0.02]
    w16 = [t.bfloat16() for t in w]
    for per in rows:
        counts = [per] * E
        x = torch.randn(per * E, D, generator=g)
        out.append({"op": f"experts ({E} x FFN)", "rows": per,
                    "fp32_ms": _time(lambda: dispatch.grouped_expert_ffn(x, counts, *w)),
                    "bf16_native_ms": _time(lambda: dispatch.grouped_expert_ffn(x.bfloat16(), counts, *w16)),
                    "bf16_widened_ms": _time(lambda: upcast.grouped_expert_ffn(x, counts, *w16)),
                    "bf16_in_registers_ms": (_time(lambda: native.grouped_swiglu(x, counts, *w16, list(range(E))))
                                             if native.available() else None)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,8,64", help="rows per call (experts: rows per expert)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = measure([int(r) for r in args.rows.split(",")])
    print("| op | rows | fp32 ms | bf16 native ms | bf16 widened to fp32 ms | bf16 widened in registers (C) ms |")
    print("|---|---|---|---|---|---|")
    for r in res:
        reg = "-" if r["bf16_in_registers_ms"] is None else f"{r['bf16_in_registers_ms']:.2f}"
        print(f"| {r['op']} | {r['rows']} | {r['fp32_ms']:.2f} | {r['bf16_native_ms']:.2f} | {r['bf16_widened_ms']:.2f} | {reg} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
