"""Rank 0 of a batch `generate` job: read the JSONL requests, run them through the gateway,
write one result line per input line (in input order). `amoe_serve.generate` uses the same
reading and writing for the local and in-process modes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

from amoe_serve.config import AmoeConfig
from amoe_serve.engine.job import make_gateway
from amoe_serve.model import load_spec
from amoe_serve.requests_io import GenerateRequest, GenerateResult, read_requests
from amoe_serve.tokenizer import Tokenizer


def read_batch(cfg: AmoeConfig, input_path: str):
    spec = load_spec(cfg.model.path)
    tok = Tokenizer.from_dir(cfg.model.path)
    with open(input_path, encoding="utf-8") as f:
        entries = read_requests(f, tok, spec.vocab_size)
    return spec, tok, entries


def write_results(output_path: str, entries, results: dict[str, GenerateResult], tok) -> int:
    """Results in input order; returns how many failed."""
    failed = 0
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for e in entries:
            res = e if isinstance(e, GenerateResult) else results[e.id]
            if res.error is None and tok is not None:
                res.text = tok.decode(res.output_token_ids)
            failed += res.error is not None
            f.write(res.to_json() + "\n")
    tmp.replace(out)
    return failed


def print_summary(entries, failed: int, seconds: float, output: str) -> None:
    print(f"[amoe-serve] {len(entries)} requests, {failed} failed, {seconds:.1f} s -> {output}",
          file=sys.stderr, flush=True)


def gateway_generate(cfg: AmoeConfig, transport, input_path: str, output_path: str,
                     stats_path: Optional[str]) -> None:
    """Rank 0 of an MPI job."""
    t0 = time.perf_counter()
    spec, tok, entries = read_batch(cfg, input_path)
    gw = make_gateway(cfg, transport, spec)
    try:
        gw.run([e for e in entries if isinstance(e, GenerateRequest)], timeout=cfg.runtime.job_timeout_s)
    finally:
        gw.shutdown()
    failed = write_results(output_path, entries, gw.results, tok)
    if stats_path:
        Path(stats_path).write_text(json.dumps({str(k): v for k, v in sorted(gw.stats.items())}, indent=1))
    print_summary(entries, failed, time.perf_counter() - t0, output_path)
