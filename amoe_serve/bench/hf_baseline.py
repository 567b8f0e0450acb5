"""The transformers baseline: `generate` on the same checkpoint, prompts and output lengths,
in static left-padded batches (the best batching `generate` offers), all cores, same dtype."""

from __future__ import annotations

import os
import sys
import time

import torch

from amoe_serve.bench.workloads import BenchRequest


def run_hf(path: str, reqs: list[BenchRequest], batch_size: int, threads: int) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
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
        print(f"\r[bench] hf-transformers: {useful} tokens, {el:5.1f} s, {useful / el:7.1f} tok/s ",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "output_tokens": useful, "threads": threads, "batch_size": batch_size}


def hf_threads() -> int:
    return len(os.sched_getaffinity(0))
