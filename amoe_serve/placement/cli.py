"""`amoe-serve place` (trace -> placement file) and `amoe-serve place-eval` (compare policies:
plan on the first half of a trace, evaluate on the second). Errors are raised as PlacementError /
TraceError; amoe_serve.cli turns them into one line on stderr and exit code 2.

Legend: R expert ranks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from amoe_serve.placement.layout import PlacementError
from amoe_serve.placement.evaluate import evaluate, markdown_table, plan_and_evaluate, summary
from amoe_serve.placement.policies import POLICIES, check_ranks, contiguous, cost_matrix, plan
from amoe_serve.placement.trace import Trace

_LOGGER = "amoe_serve.placement"


def add_placement_parsers(sub) -> None:
    p = sub.add_parser("place", help="plan an expert placement from a routing trace; writes a placement file")
    p.add_argument("--trace", required=True, help="routing trace JSON (amoe-serve trace)")
    p.add_argument("--ranks", required=True, type=int, help="number of expert ranks")
    p.add_argument("--policy", required=True, choices=POLICIES)
    p.add_argument("--output", required=True, help="placement JSON to write")
    _shared(p)
    p.set_defaults(func=cmd_place)

    e = sub.add_parser("place-eval", help="compare placement policies: plan on the first half of a "
                                          "trace, evaluate on the second; table + plot")
    e.add_argument("--trace", required=True, help="routing trace JSON (at least 2 windows)")
    e.add_argument("--ranks", required=True, type=int, help="number of expert ranks")
    e.add_argument("--out", required=True, help="folder for results.json, results.md, place_eval.png")
    e.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    _shared(e)
    e.set_defaults(func=cmd_place_eval)


def _shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--time-limit", type=float, default=60.0,
                   help="ilp: seconds for the solver in all (default 60); at the limit the best found is "
                        "kept, or greedy when nothing was found")
    p.add_argument("--replica-slots", type=int,
                   help="replicate: extra expert copies each rank may hold, over all blocks "
                        "(default: the number of blocks, i.e. one per block)")
    p.add_argument("--bandwidth", help="ilp: R x R link cost matrix (JSON list of lists, or a text "
                                       "table); default 1 between any two ranks")
    p.add_argument("--quiet", action="store_true", help="no solver progress on stderr")


def _setup_logging() -> None:
    log = logging.getLogger(_LOGGER)
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("amoe-serve: warning: %(message)s"))
        log.addHandler(h)
        log.propagate = False
        log.setLevel(logging.WARNING)


def _load_bandwidth(path: str | None, ranks: int):
    if path is None:
        return None
    f = Path(path)
    if not f.is_file():
        raise PlacementError(f"bandwidth file not found: {path}")
    text = f.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = np.loadtxt(f, delimiter="," if "," in text else None, ndmin=2)
        except ValueError as e:
            raise PlacementError(f"bandwidth file {path} is neither JSON nor a numeric table: {e}") from None
    cost_matrix(ranks, data)   # validates shape / values with a clear message
    return np.asarray(data, dtype=np.float64).tolist()


def _inputs(args: argparse.Namespace):
    """Checked arguments shared by place and place-eval: (trace, bandwidth matrix or None)."""

    _setup_logging()
    if args.time_limit <= 0:
        raise PlacementError(f"--time-limit must be positive, got {args.time_limit}")
    if args.replica_slots is not None and args.replica_slots < 0:
        raise PlacementError(f"--replica-slots must be >= 0, got {args.replica_slots}")
    trace = Trace.load(args.trace)
    check_ranks(trace, args.ranks)
    return trace, _load_bandwidth(args.bandwidth, args.ranks)


def cmd_place(args: argparse.Namespace) -> int:
    trace, bandwidth = _inputs(args)
    placement, info = plan(args.policy, trace, args.ranks, time_limit=args.time_limit,
                           replica_slots=args.replica_slots, bandwidth=bandwidth, progress=not args.quiet)
    ev = summary(evaluate(placement, trace, bandwidth))
    base = summary(evaluate(contiguous(trace, args.ranks), trace, bandwidth))
    meta = {"trace": str(args.trace), "tokens": trace.tokens, "windows": trace.num_windows,
            "objective_on_trace": ev, "contiguous_on_trace": base, "solver": info}
    if bandwidth is not None:
        meta["bandwidth"] = bandwidth
    out = Path(args.output)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(placement.to_json(policy=args.policy, meta=meta))
    extra = ""
    if info.get("fallback"):
        extra = f"; {info['fallback']}"
    elif args.policy == "replicate":
        extra = f"; {info['replicas_added']} replicas ({info['method']}, {info['replica_slots']} slots per rank)"
    elif args.policy == "ilp":
        extra = f"; stage 2 {info['stage2'].get('method')}"
    print(f"wrote {out}: policy {args.policy}, {args.ranks} ranks, on the trace: max/mean rank load "
          f"{ev['max_over_mean']:.3f} (contiguous {base['max_over_mean']:.3f}), cross-rank transitions "
          f"{ev['cross_rank_fraction']:.1%} (contiguous {base['cross_rank_fraction']:.1%}), "
          f"most experts per rank {ev['memory_max']}{extra}")
    return 0


def cmd_place_eval(args: argparse.Namespace) -> int:
    trace, bandwidth = _inputs(args)
    policies = list(dict.fromkeys(args.policies))
    result = plan_and_evaluate(trace, args.ranks, policies, args.out, time_limit=args.time_limit,
                               replica_slots=args.replica_slots, bandwidth=bandwidth, progress=not args.quiet)
    print(markdown_table(result), end="")
    out = Path(args.out)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'place_eval.png'}")
    return 0
