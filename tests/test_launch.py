"""The one data-plane launcher: command, environment and config file of `start_job`."""

import os
import stat
import subprocess
import sys

import pytest

from amoe_serve import launch
from amoe_serve.config import ConfigError, from_yaml, load_config


def test_start_job_command_env_and_private_config(tmp_path, monkeypatch):
    cfg = load_config(None, ["runtime.threads_per_rank=3", "link.token=secret-token", "deployment.expert_ranks=3"])
    path = launch.write_job_config(cfg, tmp_path / "job.yaml")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the link token
    assert from_yaml(path.read_text()).link.token == "secret-token"
    seen = {}

    class FakePopen:
        def __init__(self, cmd, env, start_new_session, preexec_fn):
            seen.update(cmd=cmd, env=env, session=start_new_session, preexec=preexec_fn)

    monkeypatch.setattr(launch.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(launch, "mpiexec_path", lambda: "/x/mpiexec")
    launch.start_job(cfg, path, ["--serve", "--address-file", "a"])
    assert seen["cmd"][:3] == ["/x/mpiexec", "-n", "5"]  # gateway + 1 attention + 3 expert ranks
    assert seen["cmd"][-6:] == ["amoe_serve.engine.rank_main", "--config", str(path), "--serve", "--address-file", "a"]
    assert seen["env"]["OMP_NUM_THREADS"] == seen["env"]["MKL_NUM_THREADS"] == "3"
    assert seen["session"] and seen["preexec"] is launch.die_with_parent


@pytest.mark.parametrize("overrides,message", [
    (["runtime.cpu_bind=socket"], "expected 'none' or 'core'"),
    (["runtime.cpu_bind=core", "runtime.threads_per_rank=2"], "cannot run runtime.threads_per_rank=2"),
])
def test_cpu_bind_rejects_what_it_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bind_to_core_pins_to_the_index_th_allowed_core_modulo_their_count():
    """In a child process (pinning the test process would slow the rest of the run)."""
    code = ("import os; from amoe_serve.procs import bind_to_core; os.sched_setaffinity(0, {0}); "
            "print(bind_to_core(5), sorted(os.sched_getaffinity(0)))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split(None, 1) == ["0", "[0]\n"]  # one allowed core: 5 mod 1 is that core
    cores = sorted(os.sched_getaffinity(0))
    code = ("from amoe_serve.procs import bind_to_core, cores_available; import os; "
            "print(bind_to_core(1), cores_available(), sorted(os.sched_getaffinity(0)))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    want = cores[1 % len(cores)]
    # cores_available still counts the job's cores: the auto wave count depends on it
    assert p.stdout.split(None, 2) == [str(want), str(len(cores)), f"[{want}]\n"]
