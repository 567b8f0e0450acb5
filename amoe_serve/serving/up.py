"""`amoe-serve up`: data plane(s) + Ray + the Serve ingress, one command, clean teardown.

Every served model gets its own MPI data-plane job (started with the venv's mpiexec, in its
own process group). A data plane that dies is restarted with back-off on the same port and
token, so the ingress (whose links reconnect) keeps running throughout. Ctrl-C or SIGTERM
tears everything down: first a graceful drain (each data plane gets SIGTERM: new requests are
answered 503, in-flight ones get `serving.drain_grace_s` to finish, the rest are failed with an
error), then Serve, Ray, and every data-plane process group. A second signal skips the drain.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from amoe_serve.config import AmoeConfig, load_config
from amoe_serve.launch import start_job, write_job_config
from amoe_serve.procs import (clean_orphaned_mpi_shm, descendants, kill_group, run_with_timeout, terminate,
                              trap_signals)
from amoe_serve.errors import AmoeError
from amoe_serve.serving.settings import endpoint_url

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
# A data plane that ran this long before it died starts the back-off from the beginning again.
RESTART_RESET_AFTER_S = 60.0
# Beyond serving.drain_grace_s: time for the gateway to cancel leftovers and stop its ranks.
DRAIN_MARGIN_S = 15.0


class UpError(AmoeError, RuntimeError):
    pass


@dataclass
class DataPlaneProcess:
    """One model's MPI job, restartable on the same address."""
    name: str
    cfg: AmoeConfig
    workdir: Path
    proc: Optional[subprocess.Popen] = None
    address: Optional[tuple[str, int]] = None
    restarts: int = 0
    next_restart: float = 0.0
    started_at: float = 0.0
    log: list[str] = field(default_factory=list)

    @property
    def address_file(self) -> Path:
        return self.workdir / f"{self.name}.address"

    def start(self) -> None:
        cfg_path = write_job_config(self.cfg, self.workdir / f"{self.name}.yaml")
        self.address_file.unlink(missing_ok=True)
        self.proc = start_job(self.cfg, cfg_path, ["--serve", "--address-file", str(self.address_file)])
        self.started_at = time.monotonic()

    def wait_ready(self, timeout: float) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.address_file.exists():
                host, port = self.address_file.read_text().strip().rsplit(":", 1)
                self.address = (host, int(port))
                return self.address
            if self.proc is not None and self.proc.poll() is not None:
                raise UpError(f"the data plane of model {self.name!r} exited with code "
                              f"{self.proc.returncode} while starting (see its messages above)")
            time.sleep(0.1)
        raise UpError(f"the data plane of model {self.name!r} did not come up within {timeout:.0f} s")

    def begin_drain(self) -> bool:
        """SIGTERM to mpiexec, which forwards it to every rank: the gateway drains (see
        engine/serve_gateway.py), then stops the ranks. False if the job is not running."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            self.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            return False
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_group(self.proc)
        clean_orphaned_mpi_shm()


def drain(planes: list[DataPlaneProcess], grace: float, abort=lambda: False) -> bool:
    """Drain every running data plane and wait (at most grace + DRAIN_MARGIN_S, or until
    `abort()`) for them to exit. True if all exited on their own."""
    draining = [p for p in planes if p.begin_drain()]
    if not draining:
        return True
    print(f"[amoe-serve] draining: no new requests; in-flight ones get up to {grace:g} s "
          f"(serving.drain_grace_s); signal again to stop at once", file=sys.stderr, flush=True)
    deadline = time.monotonic() + grace + DRAIN_MARGIN_S
    while time.monotonic() < deadline and not abort():
        if all(p.proc.poll() is not None for p in draining):
            print("[amoe-serve] drained", file=sys.stderr, flush=True)
            return True
        time.sleep(0.1)
    left = [p.name for p in draining if p.proc.poll() is None]
    if left:
        print(f"[amoe-serve] data plane(s) {', '.join(left)} did not drain in time; killing them",
              file=sys.stderr, flush=True)
    return not left


def _model_configs(cfg: AmoeConfig) -> list[tuple[str, AmoeConfig]]:
    """The primary model plus `serving.extra_models`, each a full data-plane config."""
    out = [(cfg.link.model_name, cfg)]
    for extra in cfg.serving.extra_models:
        sub = load_config(extra.config, [f"model.path={extra.path}", *extra.overrides]) if extra.config else \
            replace(cfg, model=replace(cfg.model, path=extra.path))
        sub.link = replace(cfg.link, model_name=extra.name, port=0, token=None)
        sub.serving = cfg.serving
        out.append((extra.name, sub))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise UpError(f"model names must be unique, got {names}")
    return out


def with_link_token(cfg: AmoeConfig) -> AmoeConfig:
    token = cfg.link.token or os.environ.get("AMOE_SERVE_LINK_TOKEN") or secrets.token_hex(16)
    return replace(cfg, link=replace(cfg.link, token=token))


def _start_serve(cfg: AmoeConfig, planes: list[DataPlaneProcess]) -> None:
    specs = [{"name": p.name, "path": p.cfg.model.path, "host": p.address[0], "port": p.address[1],
              "token": p.cfg.link.token} for p in planes]
    start_serve_app(cfg.serving, specs)


def ray_auth_env(env, ray_address: Optional[str]) -> None:
    """Ray's ports listen on every interface and speak pickle: a private cluster gets a random
    token (processes Ray starts inherit it) so nobody else can submit work to it. A running
    cluster (`ray_address`) keeps the auth settings of the environment."""
    if "RAY_AUTH_MODE" in env:
        return
    if ray_address:
        env["RAY_AUTH_MODE"] = "disabled"
    else:
        env["RAY_AUTH_MODE"] = "token"
        env.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


# The custom resource that slurm/launch.sh's Ray head (and no other node) advertises: on such a
# cluster the ingress replicas take a sliver of it, so they run on the head, next to the HTTP
# proxy and the gateway, and a lost worker node does not take the ingress with it.
HEAD_RESOURCE = "amoe_head"


def start_serve_app(s, specs: list[dict], ray_address: Optional[str] = None) -> None:
    """ray.init (a private local Ray, or `ray_address` of a running cluster), then the Serve
    ingress in front of the gateways in `specs` ({name, path, host, port, token}).
    Shared by `amoe-serve up` and `amoe-serve ingress` (serving/attach.py)."""
    ray_auth_env(os.environ, ray_address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from amoe_serve.serving.deployment import build_serve_app

    if ray_address:
        ray.init(address=ray_address, log_to_driver=True, configure_logging=False)
    else:
        ray.init(num_cpus=s.ray_num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True,
                 configure_logging=False)
    # One HTTP proxy, on this (the head) node: the address printed is the one to use.
    serve.start(proxy_location="HeadOnly", http_options={"host": s.host, "port": s.port})
    pin = {HEAD_RESOURCE: 0.001} if ray.cluster_resources().get(HEAD_RESOURCE) else None
    serve.run(build_serve_app(specs, s, resources=pin), name="amoe-serve", route_prefix=s.route_prefix)


def up(cfg: AmoeConfig, ready_timeout: float = 180.0) -> int:
    planes: list[DataPlaneProcess] = []
    stopping = False
    signals = 0

    def on_signal(signum, frame):
        nonlocal stopping, signals
        stopping = True
        signals += 1

    ray_started = False
    with trap_signals(on_signal) as retrap, tempfile.TemporaryDirectory(prefix="amoe-up-") as tmp:
        try:
            for name, mcfg in _model_configs(cfg):
                p = DataPlaneProcess(name, with_link_token(mcfg), Path(tmp))
                p.start()
                planes.append(p)
            for p in planes:
                host, port = p.wait_ready(ready_timeout)
                # Restarts must come back on the same address: pin the port the job got.
                p.cfg = replace(p.cfg, link=replace(p.cfg.link, port=port))
                if stopping:
                    return 130
            ray_started = True
            _start_serve(cfg, planes)
            retrap()  # ray.init installs its own SIGTERM handler; teardown must stay ours
            url = endpoint_url(cfg.serving.host, cfg.serving.port, cfg.serving.route_prefix)
            print(f"[amoe-serve] up: {url}  models: {', '.join(p.name for p in planes)}  "
                  f"(Ctrl-C to stop)", flush=True)
            while not stopping:
                time.sleep(0.2)
                _supervise(planes)
            return 0
        except UpError as e:
            print(f"amoe-serve: error: {e}", file=sys.stderr, flush=True)
            return 1
        finally:
            print("[amoe-serve] shutting down", file=sys.stderr, flush=True)
            if ray_started and signals == 1:  # the ingress still answers while the planes drain
                seen = signals
                drain(planes, cfg.serving.drain_grace_s, abort=lambda: signals > seen)
            for p in planes:
                p.stop()
            if ray_started:
                _stop_serve()
            terminate(descendants(os.getpid()))  # whatever Ray left behind


def _supervise(planes: list[DataPlaneProcess]) -> None:
    now = time.monotonic()
    for p in planes:
        if p.proc is None or p.proc.poll() is None:
            continue
        if p.next_restart == 0.0:
            kill_group(p.proc, grace=0)  # whatever of the dead job is left (a hung rank) must not hold the port
            clean_orphaned_mpi_shm()
            if now - p.started_at >= RESTART_RESET_AFTER_S:
                p.restarts = 0  # it had been serving: a fresh failure, not a crash loop
            delay = RESTART_BACKOFF_S[min(p.restarts, len(RESTART_BACKOFF_S) - 1)]
            p.next_restart = now + delay
            print(f"[amoe-serve] data plane of model {p.name!r} exited with code {p.proc.returncode}; "
                  f"restarting in {delay:.0f} s", file=sys.stderr, flush=True)
        elif now >= p.next_restart:
            p.restarts += 1
            p.next_restart = 0.0
            p.start()


def _stop_serve() -> None:
    """Graceful where possible, bounded always: Ctrl-C may already have killed Ray's daemons,
    and then serve.shutdown() would wait forever."""
    import ray
    from ray import serve

    def quietly(fn):
        def run():
            try:
                fn()
            except Exception as e:  # teardown goes on regardless
                print(f"[amoe-serve] {fn.__module__}.{fn.__name__}: {e}", file=sys.stderr)
        return run

    if not run_with_timeout(quietly(serve.shutdown), 15):
        print("[amoe-serve] Serve did not shut down in 15 s; stopping Ray", file=sys.stderr)
    run_with_timeout(quietly(ray.shutdown), 15)
