"""The transformers baseline: `generate` on the same checkpoint, prompts and output lengths,
in static left-padded batches (the best batching `generate` offers), all cores, same dtype.
Several batch sizes are run on the same requests and the fastest is reported."""

from __future__ import annotations

import os
import sys
import time

import torch

from amoe_serve.bench.workloads import BenchRequest
from amoe_serve.engine.job import DTYPES as ENGINE_DTYPES
from amoe_serve.procs import memory_mb


def sweep_sizes(sizes: list[int], num_requests: int) -> list[int]:
    """The batch sizes worth running: each capped at num_requests (a bigger one is the same
    run), deduplicated, ascending."""
    return sorted({min(int(b), num_requests) for b in sizes if b >= 1})


def best_run(runs: list[dict]) -> dict:
    """The run with the most output tokens/s; on a tie, the smaller batch."""
    if not runs:
        raise ValueError("no transformers runs to choose from")
    return max(runs, key=lambda r: (r["output_tokens"] / r["wall_s"] if r["wall_s"] > 0 else 0.0, -r["batch_size"]))


# The config names of dtypes, without "auto" (transformers is always given one).
DTYPES = {k: v for k, v in ENGINE_DTYPES.items() if v is not None}


def _load(path: str, top_k: int | None, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    extra = {"num_experts_per_tok": top_k} if top_k else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **extra).eval()


def _run_one(model, reqs: list[BenchRequest], batch_size: int, threads: int) -> dict:
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    useful = 0
    # Similar lengths batch together, as a careful user of generate would do.
    order = sorted(range(len(reqs)), key=lambda i: (reqs[i].max_tokens, len(reqs[i].prompt_token_ids)))
    t0 = time.perf_counter()
    for s in range(0, len(order), batch_size):
        batch = [reqs[i] for i in order[s:s + batch_size]]
        L = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), L), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for j, r in enumerate(batch):
            n = len(r.prompt_token_ids)
            ids[j, L - n:] = torch.tensor(r.prompt_token_ids)
            mask[j, L - n:] = 1
        new = max(r.max_tokens for r in batch)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=pad)
        useful += sum(r.max_tokens for r in batch)
        el = time.perf_counter() - t0
        print(f"\r[bench] hf-transformers batch {batch_size}: {useful} tokens, {el:5.1f} s, {useful / el:7.1f} tok/s ",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "output_tokens": useful, "threads": threads, "batch_size": batch_size,
            "output_tokens_per_s": useful / wall if wall > 0 else None}


def run_hf(path: str, reqs: list[BenchRequest], batch_sizes: int | list[int], threads: int,
           top_k: int | None = None, dtype: str = "float32") -> dict:
    """Every batch size of the sweep on the same requests (one model load); the best run's
    numbers, with every run under "sweep". top_k: the checkpoint's router at this top-k."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = _load(path, top_k, dtype)
    load_s = time.perf_counter() - t0
    # Warm-up: one short generate so first-touch costs stay out of the first size's numbers.
    with torch.inference_mode():
        model.generate(input_ids=torch.tensor([reqs[0].prompt_token_ids[:8]]), max_new_tokens=2, do_sample=False,
                       pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0)
    sizes = sweep_sizes([batch_sizes] if isinstance(batch_sizes, int) else batch_sizes, len(reqs))
    runs = [_run_one(model, reqs, b, threads) for b in sizes]
    best = best_run(runs)
    return {**best, "load_s": load_s, "dtype": dtype, "memory": memory_mb(), "sweep": [{"batch_size": r["batch_size"], "output_tokens_per_s": r["output_tokens_per_s"],
                               "wall_s": r["wall_s"]} for r in runs]}


def hf_threads() -> int:
    return len(os.sched_getaffinity(0))
