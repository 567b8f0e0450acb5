"""The one data-plane launcher: command, environment and config file of `start_job`."""

import stat

from amoe_serve import launch
from amoe_serve.config import from_yaml, load_config


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
