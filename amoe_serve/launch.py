"""Starts an MPI data-plane job with the mpiexec that ships in the venv (the `mpich` wheel),
enforces a time limit, and leaves no process behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from amoe_serve.config import AmoeConfig, to_yaml
from amoe_serve.engine.job import topology
from amoe_serve.errors import AmoeError
from amoe_serve.procs import clean_orphaned_mpi_shm, kill_group


class LaunchError(AmoeError, RuntimeError):
    """The data-plane job cannot be started (no mpiexec): one line, exit code 1."""


def mpiexec_path() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec")
    if not found:
        raise LaunchError("mpiexec not found: install the MPI runtime with `pip install mpich`")
    return found


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if the process that started it dies, even by SIGKILL,
    so a crashed launcher never leaves a data plane behind (Linux only; a no-op elsewhere)."""
    try:
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def write_job_config(cfg: AmoeConfig, path: Path) -> Path:
    """The job's config file, readable by its owner only: it holds the link token."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(to_yaml(cfg))
    return path


def start_job(cfg: AmoeConfig, cfg_path: Path, rank_args: list[str]) -> subprocess.Popen:
    """Start `rank_main` on every rank under the venv's mpiexec (the one launcher of `generate`,
    `up` and the bench; Slurm's srun runs the same module): its own process group, so a
    time-out or Ctrl-C reaches mpiexec and every rank it started, and SIGTERM if we die."""
    cmd = [mpiexec_path(), "-n", str(topology(cfg).world_size), sys.executable, "-m", "amoe_serve.engine.rank_main",
           "--config", str(cfg_path), *rank_args]
    threads = str(cfg.runtime.threads_per_rank)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)


def launch_job(cfg: AmoeConfig, rank_args: list[str]) -> int:
    """Run `rank_main` on every rank; returns the job's exit code (124 on time-out)."""
    with tempfile.TemporaryDirectory(prefix="amoe-job-") as tmp:
        p = start_job(cfg, write_job_config(cfg, Path(tmp) / "config.yaml"), rank_args)
        timeout = cfg.runtime.job_timeout_s or None
        try:
            return _wait(p, timeout)
        finally:
            clean_orphaned_mpi_shm()  # a killed job leaves its MPICH segments behind


def _wait(p: subprocess.Popen, timeout) -> int:
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"[amoe-serve] the data-plane job did not finish within {timeout:.0f} s "
              "(runtime.job_timeout_s); killed it", file=sys.stderr, flush=True)
        kill_group(p)
        return 124
    except BaseException:
        kill_group(p)
        raise
    if rc != 0:
        print(f"[amoe-serve] the data-plane job failed (exit code {rc}): a rank died or "
              "reported an error (see above); no results were written", file=sys.stderr, flush=True)
    return rc
