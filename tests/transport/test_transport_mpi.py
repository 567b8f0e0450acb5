"""Real multi-rank MPI tests: run tests/transport/mpi_worker.py under mpiexec."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import run_in_group

HERE = Path(__file__).resolve().parent
WORKER = HERE / "mpi_worker.py"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
if not MPIEXEC.exists():
    MPIEXEC = Path(shutil.which("mpiexec") or "mpiexec")

needs_mpiexec = pytest.mark.skipif(not MPIEXEC.exists(), reason="mpiexec not found")


def _clean_env() -> dict:
    """Environment without any launcher/PMI variables of an enclosing job."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "MPI_LOCAL", "OMPI_", "SLURM_"))}


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    def timed_out(out, err):
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout}s\n--- stdout\n{out}\n--- stderr\n{err}")

    return run_in_group(cmd, timeout, cwd=None, env=_clean_env(), on_timeout=timed_out)


def run_mpi(n: int, scenario: str, timeout: float = 60.0) -> str:
    cmd = [str(MPIEXEC), "-n", str(n), sys.executable, str(WORKER), scenario, str(n)]
    r = run(cmd, timeout)
    assert r.returncode == 0, f"rc={r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    for rank in range(n):
        assert f"OK {scenario} rank {rank}" in r.stdout, r.stdout + r.stderr
    return r.stdout


@needs_mpiexec
@pytest.mark.mpi(ranks=3)
def test_mpi_pairwise_all_dtypes_bitwise():
    run_mpi(3, "dtypes")


@needs_mpiexec
@pytest.mark.mpi(ranks=4)
def test_mpi_alltoallv_uneven_and_empty():
    run_mpi(4, "a2a")


@needs_mpiexec
@pytest.mark.mpi(ranks=3)
def test_mpi_many_small_messages_in_order():
    run_mpi(3, "many")


@needs_mpiexec
@pytest.mark.mpi(ranks=3)
def test_mpi_doorbell_wakes_a_waiting_rank():
    run_mpi(3, "bell")


@needs_mpiexec
@pytest.mark.mpi(ranks=3)
def test_mpi_idle_wait_low_cpu():
    out = run_mpi(3, "idle")
    assert out.count(": wall ") == 2


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_mpi_world_singleton_fails_clearly():
    code = ("from amoe_transport.mpi import mpi_world\n"
            "mpi_world(expected_size=4)\n")
    r = run([sys.executable, "-c", code], timeout=60)
    assert r.returncode != 0
    assert "TransportError" in r.stderr, r.stderr
    assert "MPI world has 1 rank but the deployment needs 4" in r.stderr, r.stderr
    assert "mpiexec -n 4" in r.stderr and "singleton" in r.stderr


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_mpi_world_singleton_ok_without_expectation():
    code = ("from amoe_transport import make_transport\n"
            "t = make_transport('mpi')\n"
            "t.isend(0, 3, {'x': 1})\n"
            "m = t.wait(5.0)\n"
            "assert m and m[0].header == {'x': 1} and m[0].tag == 3, m\n"
            "t.flush(1.0); t.close(); print('ok', t.rank, t.size)\n")
    r = run([sys.executable, "-c", code], timeout=60)
    assert r.returncode == 0 and "ok 0 1" in r.stdout, r.stderr
