"""The `amoe-serve` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from amoe_serve.config import MODES, AmoeConfig, ConfigError, load_config


class CliError(Exception):
    """A user mistake: printed as one line, exit code 2."""


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="OmegaConf YAML (e.g. configs/local.yaml)")
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
        from amoe_serve.default_model import ensure_default_model
        cfg.model.path = str(ensure_default_model())
    cfg.model.path = str(Path(cfg.model.path).expanduser().resolve())
    spec = _check_model(cfg.model.path)
    if cfg.deployment.mode != "local" and cfg.deployment.expert_ranks > spec.num_experts:
        raise CliError(f"--expert-ranks {cfg.deployment.expert_ranks} exceeds the model's "
                       f"{spec.num_experts} experts per block")
    return cfg


def _check_model(path: str):
    """A bad checkpoint fails here, in one line, before any rank starts."""
    from amoe_serve.model import load_spec
    from amoe_serve.model.attention_side import required_weight_names
    from amoe_serve.model.checkpoint import check_checkpoint
    spec = load_spec(path)
    check_checkpoint(path, spec, required_weight_names(spec))
    return spec


def cmd_generate(args: argparse.Namespace) -> int:
    if not Path(args.input).is_file():
        raise CliError(f"input file not found: {args.input}")
    cfg = _resolve(args)
    from amoe_serve.generate import run_generate
    return run_generate(cfg, args.input, args.output, args.stats)


def cmd_up(args: argparse.Namespace) -> int:
    cfg = _resolve(args)
    if args.port is not None:
        cfg.serving.port = args.port
    if args.host is not None:
        cfg.serving.host = args.host
    for extra in cfg.serving.extra_models:
        _check_model(extra.path)
    from amoe_serve.serving.up import up
    return up(cfg)


def cmd_make_default_model(args: argparse.Namespace) -> int:
    from amoe_serve.default_model import ensure_default_model
    print(ensure_default_model(Path(args.output) if args.output else None))
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

    m = sub.add_parser("make-default-model", help="write the embedded default checkpoint and print its folder")
    m.add_argument("--output", help="folder (default: the cache folder)")
    m.set_defaults(func=cmd_make_default_model)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from amoe_serve.model import CheckpointError
    from amoe_serve.engine.placement import PlacementError
    try:
        return args.func(args)
    except (CliError, ConfigError, CheckpointError, PlacementError) as e:
        print(f"amoe-serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
