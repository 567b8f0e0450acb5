"""`amoe-serve generate`: a batch of requests from JSONL through one of the three modes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

from amoe_serve.config import AmoeConfig
from amoe_serve.model import load_spec
from amoe_serve.requests_io import GenerateRequest, GenerateResult, read_requests
from amoe_serve.tokenizer import Tokenizer


def _read(cfg: AmoeConfig, input_path: str):
    spec = load_spec(cfg.model.path)
    tok = Tokenizer.from_dir(cfg.model.path)
    with open(input_path, encoding="utf-8") as f:
        entries = read_requests(f, tok, spec.vocab_size)
    return spec, tok, entries


def _write(output_path: str, entries, results: dict[str, GenerateResult], tok) -> int:
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


def _summary(entries, failed: int, seconds: float, output: str) -> None:
    print(f"[amoe-serve] {len(entries)} requests, {failed} failed, {seconds:.1f} s -> {output}",
          file=sys.stderr, flush=True)


def gateway_generate(cfg: AmoeConfig, transport, input_path: str, output_path: str,
                     stats_path: Optional[str]) -> None:
    """Rank 0 of an MPI job."""
    from amoe_serve.engine.job import make_gateway
    t0 = time.perf_counter()
    spec, tok, entries = _read(cfg, input_path)
    gw = make_gateway(cfg, transport, spec)
    try:
        gw.run([e for e in entries if isinstance(e, GenerateRequest)], timeout=cfg.runtime.job_timeout_s)
    finally:
        gw.shutdown()
    failed = _write(output_path, entries, gw.results, tok)
    if stats_path:
        Path(stats_path).write_text(json.dumps({str(k): v for k, v in sorted(gw.stats.items())}, indent=1))
    _summary(entries, failed, time.perf_counter() - t0, output_path)


def run_generate(cfg: AmoeConfig, input_path: str, output_path: str, stats_path: Optional[str] = None) -> int:
    mode = cfg.deployment.mode
    if mode != "local" and cfg.runtime.transport != "inproc":
        from amoe_serve.launch import launch_job
        args = ["--input", str(Path(input_path).resolve()), "--output", str(Path(output_path).resolve())]
        if stats_path:
            args += ["--stats", str(Path(stats_path).resolve())]
        return launch_job(cfg, args)

    t0 = time.perf_counter()
    spec, tok, entries = _read(cfg, input_path)
    reqs = [e for e in entries if isinstance(e, GenerateRequest)]
    stats: dict = {}
    if mode == "local":
        from amoe_serve.engine.local import LocalEngine
        engine = LocalEngine(cfg, spec)
        results = engine.generate(reqs)
        stats = {1: {"rank": 1, "role": "attention", "trace": engine.core.trace.snapshot().to_dict()}}
    else:
        from amoe_serve.engine.inproc import run_inproc
        results, stats = run_inproc(cfg, reqs, timeout=cfg.runtime.job_timeout_s)
    failed = _write(output_path, entries, results, tok)
    if stats_path:
        Path(stats_path).write_text(json.dumps({str(k): v for k, v in sorted(stats.items())}, indent=1))
    _summary(entries, failed, time.perf_counter() - t0, output_path)
    return 0
