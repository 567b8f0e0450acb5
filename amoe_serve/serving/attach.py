"""`amoe-serve ingress`: the Ray Serve ingress in front of gateways that are already running.

`amoe-serve up` starts the data planes itself; on a cluster a launcher (`slurm/launch.sh`,
with `srun --mpi=pmi2`) starts them, and this attach mode only starts (or joins) Ray and the
Serve ingress, pointed at `--gateway NAME=HOST:PORT` links authenticated with the token in
`--token-file`. It checks every gateway first (exit 1, one clear line, if one cannot be
reached or refuses the token), prints the endpoint URL and writes it to `--address-file`, and
tears Serve down on SIGTERM/SIGINT (exit 0) or when Ray goes away (exit 1).

`python -m amoe_serve.serving.attach plan ...` is the launcher's helper: it resolves a config
(`configs/slurm/*.yaml`: an ordinary config plus an optional `slurm:` section), pre-flights
the checkpoint, writes the job's data-plane config (0600, holds the link token) and prints
shell assignments (task count, ports, device) for `slurm/launch.sh` to `eval`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import socket
import stat
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from amoe_serve.config import AmoeConfig, ConfigError, load_config, to_yaml
from amoe_serve.errors import AmoeError
from amoe_serve.procs import run_with_timeout, trap_signals
from amoe_serve.serving.settings import endpoint_url

# Heavier modules (torch through engine/ and model/, the link client, Ray through up) are imported
# inside the commands that use them, not to dodge a cycle: `plan` runs in every Slurm batch script
# and imports in ~0.4 s without torch, ~4 s with it.

# The imports inside functions below defer torch (everything from the model, sampler or engine
# up loads it, about 2.5 s): `python -m amoe_serve.serving.attach free-port` runs in
# slurm/launch.sh before anything starts and takes 0.3 s this way. None of them dodges a cycle.

class AttachError(AmoeError, RuntimeError):
    """Printed as one line; exit code 1."""


# --------------------------------------------------------------------------- ingress


def parse_gateway(text: str) -> tuple[str, str, int]:
    """`NAME=HOST:PORT` (HOST may be `[v6]`); a bare `HOST:PORT` is the model `default`."""
    name, sep, addr = text.partition("=")
    if not sep:
        name, addr = "default", text
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    if not name or not sep or not host or not port.isdigit() or not (0 < int(port) < 65536):
        raise AttachError(f"--gateway {text!r}: expected NAME=HOST:PORT")
    return name, host, int(port)


def read_token(path: str) -> str:
    p = Path(path)
    try:
        token = p.read_text().strip()
    except OSError as e:
        raise AttachError(f"cannot read the link token file {path}: {e.strerror or e}") from None
    if not token:
        raise AttachError(f"the link token file {path} is empty")
    if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"[amoe-serve] warning: {path} is readable by others; chmod 600 it", file=sys.stderr)
    return token


async def _probe(spec: dict, timeout: float) -> Optional[str]:
    from amoe_serve.link.api import DataPlaneError
    from amoe_serve.link.client import LinkClient

    deadline = time.monotonic() + timeout
    while True:
        link = LinkClient(spec["host"], spec["port"], spec["token"], connect_timeout=min(5.0, timeout))
        try:
            await link.connect()
            return None
        except DataPlaneError as e:
            if "refused the link" in str(e) or time.monotonic() >= deadline:
                return str(e)
            await asyncio.sleep(0.5)
        finally:
            try:
                await link.close()
            except Exception:  # noqa: BLE001 - a probe never fails on close
                pass


def check_gateways(specs: list[dict], timeout: float) -> None:
    """Connect + authenticate to every gateway (retrying up to `timeout` s); AttachError if not."""
    async def all_() -> list[Optional[str]]:
        return await asyncio.gather(*(_probe(s, timeout) for s in specs))

    errors = [f"gateway {s['name']!r} at {s['host']}:{s['port']}: {err}"
              for s, err in zip(specs, asyncio.run(all_())) if err]
    if errors:
        raise AttachError("; ".join(errors))


def write_atomic(path: str, text: str) -> None:
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(p)


def ingress(cfg: AmoeConfig, specs: list[dict], ray_address: Optional[str] = None,
            address_file: Optional[str] = None, check_timeout: float = 10.0) -> int:
    from amoe_serve.serving.up import _stop_serve, start_serve_app

    stopping: list[int] = []

    def on_signal(signum, frame):
        stopping.append(signum)

    with trap_signals(on_signal) as retrap:
        started = False
        try:
            check_gateways(specs, check_timeout)
            if stopping:
                return 0
            started = True
            start_serve_app(cfg.serving, specs, ray_address)
            retrap()  # ray.init installs its own SIGTERM handler; teardown must stay ours
            url = endpoint_url(cfg.serving.host, cfg.serving.port, cfg.serving.route_prefix)
            if address_file:
                write_atomic(address_file, url + "\n")
            print(f"[amoe-serve] ingress up: {url}  models: {', '.join(s['name'] for s in specs)}  "
                  f"gateways: {', '.join('%s:%s' % (s['host'], s['port']) for s in specs)}", flush=True)
            import ray
            while not stopping:
                time.sleep(0.5)
                if not ray.is_initialized():
                    raise AttachError("lost the connection to Ray")
            return 0
        except AttachError as e:
            print(f"amoe-serve: error: {e}", file=sys.stderr, flush=True)
            return 1
        except Exception as e:  # Ray/Serve failed to start: say so in one line, exit non-zero
            print(f"amoe-serve: error: the Serve ingress failed: {type(e).__name__}: {e}", file=sys.stderr,
                  flush=True)
            return 1
        finally:
            if started:
                print("[amoe-serve] ingress shutting down", file=sys.stderr, flush=True)
                if address_file:
                    Path(address_file).unlink(missing_ok=True)
                if ray_address:
                    _leave_cluster()
                else:
                    _stop_serve()


def _leave_cluster() -> None:
    """Shut Serve down on a Ray cluster someone else owns, briefly: under scancel the cluster's
    daemons get SIGTERM at the same time, and teardown must finish within Slurm's KillWait."""
    import ray
    from ray import serve

    def quietly(fn):
        def run():
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - teardown goes on regardless
                print(f"[amoe-serve] {fn.__module__}.{fn.__name__}: {e}", file=sys.stderr)
        return run

    if not run_with_timeout(quietly(serve.shutdown), 8):
        print("[amoe-serve] Serve did not shut down in 8 s (is Ray stopping?)", file=sys.stderr)
    run_with_timeout(quietly(ray.shutdown), 4)


def add_ingress_parser(sub) -> None:
    """Registers `amoe-serve ingress` (called from amoe_serve/cli.py)."""
    p = sub.add_parser("ingress", help="serve the OpenAI API in front of running gateways (attach mode, "
                       "e.g. data planes started by srun)")
    p.add_argument("--gateway", action="append", required=True, metavar="NAME=HOST:PORT",
                   help="a running gateway (rank 0 of a data plane started with --serve); repeat per model")
    p.add_argument("--token-file", required=True, help="file holding the link token (chmod 600)")
    p.add_argument("--config", help="config of the data plane(s) (serving.* settings, model.path for "
                   "the tokenizer)")
    p.add_argument("--model", help="checkpoint folder, for the tokenizer (default: the config's model.path)")
    p.add_argument("--host", help="HTTP interface (default serving.host)")
    p.add_argument("--port", type=int, help="HTTP port (default serving.port)")
    p.add_argument("--address-file", help="write the endpoint URL (http://HOST:PORT[/serving.route_prefix]/v1) here once "
                   "serving")
    p.add_argument("--ray-address", help="join this Ray cluster (`auto` or HOST:PORT) instead of starting "
                   "a private one")
    p.add_argument("--check-timeout", type=float, default=10.0,
                   help="seconds to keep trying each gateway at start before giving up (default 10)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. serving.num_replicas=2")
    p.set_defaults(func=cmd_ingress)


def cmd_ingress(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.path={args.model}")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not KEY=VALUE")
    cfg = load_config(args.config, overrides)
    if args.host is not None:
        cfg.serving.host = args.host
    if args.port is not None:
        cfg.serving.port = args.port
    try:
        token = read_token(args.token_file)
        gateways = [parse_gateway(g) for g in args.gateway]
    except AttachError as e:
        print(f"amoe-serve: error: {e}", file=sys.stderr)
        return 2
    names = [n for n, _, _ in gateways]
    if len(set(names)) != len(names):
        print(f"amoe-serve: error: gateway names must be unique, got {names}", file=sys.stderr)
        return 2
    path = str(Path(cfg.model.path).expanduser().resolve()) if cfg.model.path else None
    specs = [{"name": n, "path": path, "host": h, "port": p, "token": token} for n, h, p in gateways]
    return ingress(cfg, specs, args.ray_address, args.address_file, args.check_timeout)


# --------------------------------------------------------------------------- launcher plan

SLURM_KEYS = {
    "distribution": "block",     # srun --distribution for the data plane: block | cyclic
    "node_of_rank": None,        # [node index per MPI rank] (rank 0, the gateway, on node 0)
    "ready_timeout_s": 300,      # how long the data plane may take to open its gateway
    "ray_num_cpus": 1,           # CPUs Ray advertises per node (the ingress replicas take 0)
    "gpus_per_node": 0,          # 0: as many as CUDA_VISIBLE_DEVICES / nvidia-smi show
}


def _split_slurm_section(path: Optional[str], overrides: list[str]) -> tuple[Optional[dict], list[str], dict]:
    """The config file's data without `slurm:`, the overrides without `slurm.*`, and the
    slurm settings (defaults, then the file, then `slurm.KEY=VALUE` overrides)."""
    from omegaconf import OmegaConf

    slurm = dict(SLURM_KEYS)
    data = None
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        data = OmegaConf.to_container(OmegaConf.load(path))
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        slurm.update(data.pop("slurm", None) or {})
    rest = []
    for o in overrides:
        if o.startswith("slurm."):
            key, _, val = o[len("slurm."):].partition("=")
            slurm[key] = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={val}"]))["v"]
        else:
            rest.append(o)
    unknown = sorted(set(slurm) - set(SLURM_KEYS))
    if unknown:
        raise ConfigError(f"unknown slurm setting(s) {unknown}: expected {sorted(SLURM_KEYS)}")
    if slurm["distribution"] not in ("block", "cyclic"):
        raise ConfigError(f"slurm.distribution={slurm['distribution']!r}: expected block or cyclic")
    return data, rest, slurm


def plan(config: Optional[str], overrides: list[str], jobdir: Path, nnodes: int) -> dict[str, str]:
    from omegaconf import OmegaConf

    from amoe_serve.model.check import check_model
    from amoe_serve.engine.job import topology

    data, rest, slurm = _split_slurm_section(config, overrides)
    if data is not None:
        clean = jobdir / "source-config.yaml"
        clean.write_text(OmegaConf.to_yaml(OmegaConf.create(data)))
        config = str(clean)
    cfg = load_config(config, rest)
    if cfg.deployment.mode == "local":
        raise ConfigError("deployment.mode=local runs in one process; use aep or lockstep on Slurm")
    if cfg.serving.extra_models:
        raise ConfigError("serving.extra_models is not supported by slurm/launch.sh (one model per job)")
    if cfg.model.path is None:
        from amoe_serve.default_model import ensure_default_model
        cfg.model.path = str(ensure_default_model())
    cfg.model.path = str(Path(cfg.model.path).expanduser().resolve())
    spec = check_model(cfg.model.path)  # a bad checkpoint fails here, before any rank starts
    if cfg.deployment.expert_ranks > spec.num_experts:
        raise ConfigError(f"deployment.expert_ranks={cfg.deployment.expert_ranks} exceeds the model's "
                          f"{spec.num_experts} experts per block")
    world = topology(cfg).world_size
    token_file = jobdir / "link.token"
    token = token_file.read_text().strip()
    # One node: the gateway listens on loopback. Several: on every interface (HMAC-authenticated),
    # reached by the head node's address, since ingress replicas may run on any Ray node.
    link_host = cfg.link.host if nnodes <= 1 else "0.0.0.0"
    cfg = replace(cfg, link=replace(cfg.link, token=token, host=link_host))
    cfg_path = jobdir / "config.yaml"
    fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(to_yaml(cfg))
    (jobdir / "source-config.yaml").unlink(missing_ok=True)
    node_of_rank = slurm["node_of_rank"]
    if node_of_rank is not None:
        if len(node_of_rank) != world or any(not (0 <= int(n) < nnodes) for n in node_of_rank):
            raise ConfigError(f"slurm.node_of_rank needs {world} node indices in [0, {nnodes})")
        if int(node_of_rank[0]) != 0:
            raise ConfigError("slurm.node_of_rank[0] must be 0: the gateway runs on the first node, beside "
                              "the ingress")
    return {
        "AMOE_NTASKS": str(world),
        "AMOE_ATTENTION_RANKS": str(cfg.deployment.attention_ranks),
        "AMOE_EXPERT_RANKS": str(cfg.deployment.expert_ranks),
        "AMOE_MODEL_NAME": cfg.link.model_name,
        "AMOE_MODEL_PATH": cfg.model.path,
        "AMOE_JOB_CONFIG": str(cfg_path),
        "AMOE_SERVE_HOST": cfg.serving.host,
        "AMOE_SERVE_PORT": str(cfg.serving.port),
        "AMOE_ROUTE_PREFIX": cfg.serving.route_prefix.rstrip("/"),  # "" or /PREFIX: before /v1 in URLs
        "AMOE_DEVICE": cfg.runtime.device,
        "AMOE_THREADS": str(cfg.runtime.threads_per_rank),
        "AMOE_DISTRIBUTION": slurm["distribution"],
        "AMOE_NODE_OF_RANK": " ".join(str(int(n)) for n in node_of_rank or []),
        "AMOE_READY_TIMEOUT": str(int(slurm["ready_timeout_s"])),
        "AMOE_RAY_CPUS": str(int(slurm["ray_num_cpus"])),
        "AMOE_GPUS_PER_NODE": str(int(slurm["gpus_per_node"])),
    }


def _plan_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m amoe_serve.serving.attach plan")
    ap.add_argument("--config")
    ap.add_argument("--jobdir", required=True, help="holds link.token; gets config.yaml")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    from amoe_serve.placement.layout import PlacementError
    from amoe_serve.model import CheckpointError
    try:
        bad = [o for o in args.overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not KEY=VALUE")
        out = plan(args.config, args.overrides, Path(args.jobdir), args.nodes)
    except (ConfigError, CheckpointError, PlacementError, OSError) as e:
        print(f"amoe-serve: error: {e}", file=sys.stderr)
        return 2
    for k, v in out.items():
        print(f"{k}={shlex.quote(v)}")
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    if sys.argv[1:2] == ["plan"]:
        sys.exit(_plan_main(sys.argv[2:]))
    if sys.argv[1:2] == ["free-port"]:
        print(free_port())
        sys.exit(0)
    print("usage: python -m amoe_serve.serving.attach plan|free-port ...", file=sys.stderr)
    sys.exit(2)
