"""The `amoe-serve` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from amoe_serve.bench.bench_config import BenchConfig, load_bench_config
from amoe_serve.bench.place_bench import load_place_bench_config, run_place_bench
from amoe_serve.bench.run import bench_model_path, run_bench
from amoe_serve.bench.hf_baseline import DTYPES as HF_DTYPES
from amoe_serve.bench.synth_checkpoint import SHAPES, write_checkpoint
from amoe_serve.bench.trace_record import record_trace
from amoe_serve.bench.workloads import WORKLOADS
from amoe_serve.config import MODES, AmoeConfig, load_config
from amoe_serve.default_model import default_cache_root, ensure_default_model
from amoe_serve.errors import AmoeError, UserInputError
from amoe_serve.generate import run_generate
from amoe_serve.model.check import check_model
from amoe_serve.placement.cli import add_placement_parsers
from amoe_serve.serving.attach import add_ingress_parser
from amoe_serve.serving.up import up
from amoe_serve.sim.calibrate import calibrate
from amoe_serve.sim.sim_config import load_sim_config
from amoe_serve.sim.run import run_and_write


class CliError(UserInputError):
    """A user mistake in the arguments: printed as one line, exit code 2."""


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", help="OmegaConf YAML (e.g. configs/local.yaml); repeat to "
                   "merge several in order, e.g. configs/deployments/aep-2a-3e.yaml configs/schedulers/mtfs.yaml")
    p.add_argument("--model", help="Hugging Face checkpoint folder (default: the embedded default model)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="OmegaConf dotlist overrides, e.g. scheduler.policy=mtfs")


def _resolve(args: argparse.Namespace) -> AmoeConfig:
    overrides = list(args.overrides)
    for flag, key in (("model", "model.path"), ("dtype", "model.dtype"), ("mode", "deployment.mode"),
                      ("attention_ranks", "deployment.attention_ranks"),
                      ("expert_ranks", "deployment.expert_ranks"), ("timeout", "runtime.job_timeout_s")):
        val = getattr(args, flag, None)
        if val is not None:
            overrides.append(f"{key}={val}")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise CliError(f"override {bad[0]!r} is not KEY=VALUE")
    cfg = load_config(args.config, overrides)
    if cfg.model.path is None:
        cfg.model.path = str(ensure_default_model())
    cfg.model.path = str(Path(cfg.model.path).expanduser().resolve())
    spec = check_model(cfg.model.path)
    if cfg.deployment.mode != "local" and cfg.deployment.expert_ranks > spec.num_experts:
        raise CliError(f"--expert-ranks {cfg.deployment.expert_ranks} exceeds the model's "
                       f"{spec.num_experts} experts per block")
    return cfg


def cmd_generate(args: argparse.Namespace) -> int:
    if not Path(args.input).is_file():
        raise CliError(f"input file not found: {args.input}")
    cfg = _resolve(args)
    return run_generate(cfg, args.input, args.output, args.stats)


def cmd_up(args: argparse.Namespace) -> int:
    cfg = _resolve(args)
    if args.port is not None:
        cfg.serving.port = args.port
    if args.host is not None:
        cfg.serving.host = args.host
    for extra in cfg.serving.extra_models:
        check_model(extra.path)
    return up(cfg)


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = load_bench_config(args.config, args.overrides)
    if cfg.model.path:
        check_model(cfg.model.path)
    run_bench(cfg, Path(args.output), default_cache_root())
    print(f"[amoe-serve] bench results: {Path(args.output) / 'results.json'}, plot: {Path(args.output) / 'bench.png'}")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    if args.input and not Path(args.input).is_file():
        raise CliError(f"input file not found: {args.input}")
    if args.num_requests < 1:
        raise CliError("--num-requests must be >= 1")
    cfg = _resolve(args)
    record_trace(cfg, args.output, args.input, args.workload, args.num_requests, args.seed)
    return 0


def cmd_place_bench(args: argparse.Namespace) -> int:
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise CliError(f"override {bad[0]!r} is not KEY=VALUE")
    cfg = load_place_bench_config(args.config, list(args.overrides))
    if cfg.model.path:
        check_model(cfg.model.path)
    run_place_bench(cfg, Path(args.output), default_cache_root())
    print(f"[amoe-serve] place-bench results: {Path(args.output) / 'results.md'}")
    return 0


def cmd_make_default_model(args: argparse.Namespace) -> int:
    print(ensure_default_model(Path(args.output) if args.output else None))
    return 0


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    """A random-weight checkpoint in a published shape (weights cannot be downloaded here)."""
    overrides = {}
    if args.blocks is not None:
        if args.blocks < 1:
            raise CliError(f"--blocks {args.blocks}: expected >= 1")
        overrides["num_hidden_layers"] = args.blocks
    if args.shard_gb <= 0:
        raise CliError(f"--shard-gb {args.shard_gb}: expected > 0")
    out = Path(args.output)
    if (out / "config.json").exists():
        raise CliError(f"{out} already holds a checkpoint")
    report = write_checkpoint(args.shape, out, HF_DTYPES[args.dtype], args.shard_gb, args.seed, overrides)
    print(report.line())
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    """Cluster simulator (amoe_serve.sim): AEP vs lockstep at scale, or calibrate the local table."""
    if args.calibrate:
        out = args.calibrate
        model = args.model
        if model is None:  # the bench model (configs/bench: Mixtral-shaped, random weights)
            model = bench_model_path(BenchConfig(), default_cache_root())
        elif not (Path(model) / "config.json").is_file():
            raise CliError(f"sim --model {model}: no checkpoint there (config.json missing)")
        t = calibrate(out, model, quick=args.quick)
        print(f"wrote {out}: expert_points={len(t.expert_points)} attention_fit={t.attention_fit} "
              f"lm_head_fit={t.lm_head_fit} cores={t.cores}")
        return 0
    if not args.output:
        raise CliError("sim: --output DIR is required (or --calibrate FILE)")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise CliError(f"override {bad[0]!r} is not KEY=VALUE")
    cfg = load_sim_config(args.config, list(args.overrides))
    run_and_write(cfg, args.output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="amoe-serve", description="Serve Mixture-of-Experts models with "
                                 "Asynchronous Expert Parallelism.")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="run a batch of requests from JSONL")
    g.add_argument("--input", required=True, help="JSONL: {id, prompt | prompt_token_ids, max_tokens, ...}")
    g.add_argument("--output", required=True, help="JSONL: {id, output_token_ids, text, finish_reason}")
    g.add_argument("--mode", choices=MODES)
    g.add_argument("--attention-ranks", type=int)
    g.add_argument("--expert-ranks", type=int)
    g.add_argument("--stats", help="write every rank's counters here as JSON")
    g.add_argument("--timeout", type=float, help="kill the job after this many seconds")
    _common_model_args(g)
    g.set_defaults(func=cmd_generate)

    u = sub.add_parser("up", help="serve the OpenAI API: data plane(s) + Ray Serve ingress, until Ctrl-C")
    u.add_argument("--mode", choices=MODES)
    u.add_argument("--attention-ranks", type=int)
    u.add_argument("--expert-ranks", type=int)
    u.add_argument("--host", help="HTTP interface (default serving.host, loopback)")
    u.add_argument("--port", type=int, help="HTTP port (default serving.port, 8000)")
    _common_model_args(u)
    u.set_defaults(func=cmd_up, timeout=None)

    bn = sub.add_parser("bench", help="AEP vs lockstep vs transformers on one checkpoint, in one run")
    bn.add_argument("--config", help="bench YAML, e.g. configs/bench/paper-short.yaml")
    bn.add_argument("--output", required=True, help="folder for results.json, results.md and bench.png")
    bn.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. num_requests=16 systems=[aep]")
    bn.set_defaults(func=cmd_bench)

    add_ingress_parser(sub)  # `amoe-serve ingress`: Serve in front of running gateways (e.g. srun)

    sm = sub.add_parser("sim", help="discrete-event cluster simulator: AEP vs lockstep, results.json + plots")
    sm.add_argument("--config", help="simulator YAML, e.g. configs/sim/paper-16gpu.yaml")
    sm.add_argument("--output", help="folder for results.json, summary.json and the plots")
    sm.add_argument("--calibrate", metavar="FILE", help="measure this machine and write a local device table")
    sm.add_argument("--quick", action="store_true", help="with --calibrate: fewer repetitions")
    sm.add_argument("--model", metavar="CKPT", help="with --calibrate: the checkpoint whose ranks are timed "
                                                    "(default: the bench model)")
    sm.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. cluster.gpus=[8] run.policies=[mtfs]")
    sm.set_defaults(func=cmd_sim)

    tr = sub.add_parser("trace", help="run a workload and write the routing trace (tokens per expert, "
                        "block-to-block transitions) for `amoe-serve place`")
    tr.add_argument("--output", required=True, help="trace file (JSON, format amoe-trace v1)")
    tr.add_argument("--input", help="requests JSONL as for `generate` (default: a synthetic workload)")
    tr.add_argument("--workload", choices=sorted(WORKLOADS), default="short")
    tr.add_argument("--num-requests", type=int, default=64)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--mode", choices=MODES)
    tr.add_argument("--attention-ranks", type=int)
    tr.add_argument("--expert-ranks", type=int)
    tr.add_argument("--timeout", type=float, help="kill the job after this many seconds")
    _common_model_args(tr)
    tr.set_defaults(func=cmd_trace)

    pb = sub.add_parser("place-bench", help="placement policies end to end: trace, plan on its first half, "
                        "evaluate on the second, serve the bench workload with each placement")
    pb.add_argument("--config", help="YAML, e.g. configs/placement/bench-skewed.yaml")
    pb.add_argument("--output", required=True, help="folder for trace.json, placement-*.json, results.{json,md}, "
                    "place_bench.png")
    pb.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. num_requests=16 policies=[greedy]")
    pb.set_defaults(func=cmd_place_bench)

    add_placement_parsers(sub)  # `amoe-serve place` (trace -> placement file), `amoe-serve place-eval`

    mc = sub.add_parser("make-checkpoint", help="write a seeded random-weight checkpoint in a published shape "
                        "(sharded safetensors, tokenizer), streaming: peak memory is one tensor")
    mc.add_argument("--shape", required=True, choices=sorted(SHAPES), help="; ".join(
        f"{k}: {v.note}" for k, v in sorted(SHAPES.items())))
    mc.add_argument("--output", required=True, help="new folder")
    mc.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    mc.add_argument("--shard-gb", type=float, default=5.0, help="largest shard (GiB; the hub uses ~5)")
    mc.add_argument("--blocks", type=int, help="fewer blocks than published (same widths)")
    mc.add_argument("--seed", type=int, default=0)
    mc.set_defaults(func=cmd_make_checkpoint)

    m = sub.add_parser("make-default-model", help="write the embedded default checkpoint and print its folder")
    m.add_argument("--output", help="folder (default: the cache folder)")
    m.set_defaults(func=cmd_make_default_model)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AmoeError as e:
        # Every error of the package (amoe_serve.errors): one line and its exit code, no traceback.
        print(f"amoe-serve: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
