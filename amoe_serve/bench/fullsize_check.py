"""Greedy tokens of the data plane (`generate`, real MPI ranks) against transformers' `generate`
on the same checkpoint: exact where both compute in fp32 on the same (bf16-valued) weights, an
agreement rate where transformers can only run in bf16.

    python -m amoe_serve.bench.fullsize_check CKPT --hf-dtype float32 --compute-dtype float32
    python -m amoe_serve.bench.fullsize_check CKPT --hf-dtype bfloat16 --compute-dtype bfloat16

Prints and writes (--output) one JSON report: per prompt both token lists, the first position
where they differ, and the fraction of positions that agree before the first difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from amoe_serve.bench.hf_baseline import DTYPES
from amoe_serve.procs import memory_mb

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Mixture-of-Experts models route each token",
           "import numpy as np\nx = np.", "Once upon a time"]


def hf_greedy(path: str, prompts: list[list[int]], new: int, dtype: str) -> tuple[list[list[int]], dict]:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    load_s = time.perf_counter() - t0
    out = []
    t1 = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:  # one at a time: no padding in the reference
            g = model.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=model.config.pad_token_id or 0)
            out.append(g[0, len(p):].tolist())
    return out, {"load_s": load_s, "generate_s": time.perf_counter() - t1, "memory": memory_mb()}


def ours(path: str, prompts: list[list[int]], new: int, mode: str, compute: str, ranks: tuple[int, int],
         extra: list[str]) -> tuple[list[list[int]], dict]:
    with tempfile.TemporaryDirectory() as tmp:
        inp, outp, stats = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl", Path(tmp) / "stats.json"
        inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt_token_ids": p, "max_tokens": new,
                                           "ignore_eos": True}) + "\n" for i, p in enumerate(prompts)))
        cmd = [sys.executable, "-m", "amoe_serve.cli", "generate", "--input", str(inp), "--output", str(outp),
               "--stats", str(stats), "--mode", mode, "--attention-ranks", str(ranks[0]),
               "--expert-ranks", str(ranks[1]), "--model", path, "model.dtype=auto",
               f"model.compute_dtype={compute}", *extra]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        rows = {r["id"]: r["output_token_ids"] for r in map(json.loads, outp.read_text().splitlines())}
        st = json.loads(stats.read_text())
    mem = {k: {"role": r.get("role"), **r["memory"]} for k, r in st.items() if isinstance(r, dict) and "memory" in r}
    return [rows[f"p{i}"] for i in range(len(prompts))], {"wall_s": wall, "rank_memory_mb": mem}


def compare(a: list[list[int]], b: list[list[int]]) -> dict:
    first = []
    for x, y in zip(a, b):
        d = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None)
        first.append(d)
    n = sum(len(x) for x in a)
    agree = sum(len(x) if d is None else d for x, d in zip(a, first))
    return {"exact": all(d is None for d in first), "first_difference": first,
            "agreeing_prefix_fraction": agree / n if n else 1.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--hf-dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--compute-dtype", choices=["float32", "bfloat16", "auto"], default="float32")
    ap.add_argument("--mode", default="aep")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--ranks", default="1,2", help="attention,expert")
    ap.add_argument("--set", action="append", default=[], help="more data-plane overrides")
    ap.add_argument("--output", help="write the report here (JSON)")
    args = ap.parse_args(argv)
    from amoe_serve.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(args.checkpoint)
    prompts = [tok.encode(p) for p in PROMPTS]
    ranks = tuple(int(x) for x in args.ranks.split(","))
    got, ours_info = ours(args.checkpoint, prompts, args.new_tokens, args.mode, args.compute_dtype, ranks, args.set)
    want, hf_info = hf_greedy(args.checkpoint, prompts, args.new_tokens, args.hf_dtype)
    report = {"checkpoint": args.checkpoint, "hf_dtype": args.hf_dtype, "compute_dtype": args.compute_dtype,
              "mode": args.mode, "ranks": ranks, "prompts": prompts, "ours": got, "transformers": want,
              **compare(got, want), "ours_info": ours_info, "hf_info": hf_info}
    text = json.dumps(report, indent=1)
    if args.output:
        Path(args.output).write_text(text)
    print(json.dumps({k: report[k] for k in ("exact", "first_difference", "agreeing_prefix_fraction")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
