"""`amoe-serve trace`: run a workload through the data plane and write its routing trace.

The workload is a requests JSONL (like `generate`'s) or one of the paper's synthetic workloads;
it runs in the configured mode (local, in-process ranks, or an MPI job), and the trace every
attention rank recorded comes back in its final report.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

from amoe_serve.config import AmoeConfig
from amoe_serve.placement.trace import Trace, TraceError
from amoe_serve.bench.workloads import make_requests
from amoe_serve.generate import run_generate
from amoe_serve.model import load_spec


def write_workload(path: Path, workload: str, num_requests: int, vocab: int, seed: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(make_requests(workload, num_requests, 0.0, vocab, seed)):
            f.write(json.dumps({"id": f"t{i}", "prompt_token_ids": r.prompt_token_ids,
                                "max_tokens": r.max_tokens, "ignore_eos": True}) + "\n")


def traces_from_stats(stats: dict) -> Trace:
    parts = [Trace.from_dict(s["trace"], f"rank {k} trace") for k, s in sorted(stats.items(), key=lambda kv: int(kv[0]))
             if isinstance(s, dict) and s.get("role") == "attention" and "trace" in s]
    if not parts:
        raise TraceError("the data plane reported no routing trace (no attention rank finished)")
    return Trace.merge(parts)


def record_trace(cfg: AmoeConfig, output: str | Path, input_path: Optional[str] = None,
                 workload: str = "short", num_requests: int = 64, seed: int = 0) -> Trace:
    spec = load_spec(cfg.model.path)
    source = f"file:{input_path}" if input_path else f"{workload} x {num_requests} (seed {seed})"
    with tempfile.TemporaryDirectory(prefix="amoe-trace-") as tmp:
        tmpd = Path(tmp)
        if input_path is None:
            input_path = str(tmpd / "requests.jsonl")
            write_workload(Path(input_path), workload, num_requests, spec.vocab_size, seed)
        rc = run_generate(cfg, input_path, str(tmpd / "out.jsonl"), str(tmpd / "stats.json"))
        if rc != 0:
            raise TraceError(f"the data plane job failed (exit {rc}); no trace written")
        trace = traces_from_stats(json.loads((tmpd / "stats.json").read_text()))
    r = cfg.routing
    trace.meta.update({"model": cfg.model.path, "mode": cfg.deployment.mode,
                       "workload": source,
                       "routing": {"mode": r.mode, "rate": r.rate, "top_k": r.top_k, "seed": r.seed,
                                   "affinity": r.affinity}})
    trace.save(output)
    print(f"[amoe-serve] trace: {trace.tokens} tokens in {trace.num_windows} windows, "
          f"{trace.num_blocks} blocks x {trace.num_experts} experts (top-{trace.top_k}) -> {output}",
          file=sys.stderr, flush=True)
    return trace
