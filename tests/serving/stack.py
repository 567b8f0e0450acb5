"""`amoe-serve up` as a test fixture: started as a user would, waited for, stopped by pid."""

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support import REPO, popen_group, stop_stack


def _up_process(config: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):  # `up` picks Ray's auth itself
        env.pop(k, None)
    return popen_group([sys.executable, "-m", "amoe_serve.cli", "up", "--config", str(config)], cwd=REPO,
                       env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _wait_healthy(base: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"amoe-serve up exited early:\n{log.read_text()[-4000:]}"
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"not healthy within {timeout} s:\n{log.read_text()[-4000:]}")


@contextmanager
def up_stack(tmp: Path, cfg: dict, stop_wait_s: float):
    """`amoe-serve up` on cfg (written as tmp/serve.json: OmegaConf reads JSON as YAML), once
    healthy; yields base URL (with serving.route_prefix), process, log and tmp; stopped by pid
    on exit."""
    config = tmp / "serve.json"
    config.write_text(json.dumps(cfg))
    log = tmp / "up.log"
    proc = _up_process(config, log)
    base = f"http://127.0.0.1:{cfg['serving']['port']}{cfg['serving'].get('route_prefix', '/').rstrip('/')}"
    try:
        _wait_healthy(base, proc, log)
        yield {"base": base, "proc": proc, "log": log, "tmp": tmp}
    finally:
        stop_stack(proc, stop_wait_s)
