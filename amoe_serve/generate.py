"""`amoe-serve generate`: a batch of requests from JSONL through one of the three modes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from amoe_serve.config import AmoeConfig
from amoe_serve.engine.batch_job import print_summary, read_batch, write_results
from amoe_serve.engine.inproc import run_inproc
from amoe_serve.engine.local import LocalEngine
from amoe_serve.launch import launch_job
from amoe_serve.requests_io import GenerateRequest


def run_generate(cfg: AmoeConfig, input_path: str, output_path: str, stats_path: Optional[str] = None) -> int:
    mode = cfg.deployment.mode
    if mode != "local" and cfg.runtime.transport != "inproc":
        args = ["--input", str(Path(input_path).resolve()), "--output", str(Path(output_path).resolve())]
        if stats_path:
            args += ["--stats", str(Path(stats_path).resolve())]
        return launch_job(cfg, args)

    t0 = time.perf_counter()
    spec, tok, entries = read_batch(cfg, input_path)
    reqs = [e for e in entries if isinstance(e, GenerateRequest)]
    stats: dict = {}
    if mode == "local":
        engine = LocalEngine(cfg, spec)
        results = engine.generate(reqs)
        stats = {1: {"rank": 1, "role": "attention", "trace": engine.core.trace.snapshot().to_dict()}}
    else:
        results, stats = run_inproc(cfg, reqs, timeout=cfg.runtime.job_timeout_s)
    failed = write_results(output_path, entries, results, tok)
    if stats_path:
        Path(stats_path).write_text(json.dumps({str(k): v for k, v in sorted(stats.items())}, indent=1))
    print_summary(entries, failed, time.perf_counter() - t0, output_path)
    return 0
