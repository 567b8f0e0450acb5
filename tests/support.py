"""Shared pieces of end-to-end tests: small odd-sized checkpoints of each architecture,
transformers' greedy outputs for them (fixtures registered in tests/conftest.py), and helpers
that run the `amoe-serve` CLI."""

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from amoe_serve import procs
from amoe_serve.procs import alive
from amoe_serve.procs import stop_tree as stop_stack  # noqa: F401  (SIGTERM, then SIGKILL the tree)
from tests.model.hf_factory import load_hf, make_checkpoint

ARCHS = ["mixtral", "qwen2_moe", "olmoe"]
PROMPTS = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13], [200, 3, 150, 99, 1, 250, 31, 77, 64, 2, 18, 101], [33, 44, 55, 66, 77]]
MAX_NEW = 8
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {a: make_checkpoint(a, root / a, seed=1) for a in ARCHS}


@pytest.fixture(scope="session")
def hf_reference(checkpoints):
    """transformers generate, greedy, one prompt at a time (no padding effects)."""
    ref = {}
    for arch, path in checkpoints.items():
        model = load_hf(path, torch.float32)
        outs = []
        for p in PROMPTS:
            with torch.no_grad():
                g = model.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False)
            outs.append(g[0, len(p):].tolist())
        ref[arch] = outs
    return ref


def write_requests(path: Path, prompts=PROMPTS, max_tokens=MAX_NEW, extra=None) -> Path:
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": f"r{i}", "prompt_token_ids": p, "max_tokens": max_tokens, **(extra or {})}) + "\n")
    return path


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def popen_group(cmd: list[str], **kw) -> subprocess.Popen:
    """Start cmd in its own process group (a new session), so it and everything it starts
    (mpiexec, ranks, Ray) can be killed together with `kill_group`."""
    return subprocess.Popen(cmd, start_new_session=True, **kw)


def kill_group(p: subprocess.Popen) -> tuple:
    """If p still runs, SIGKILL its whole process group (`amoe_serve.procs.kill_group`, no
    grace); then reap it and return what it wrote to its pipes as (stdout, stderr)."""
    if p.poll() is None:
        procs.kill_group(p, grace=0)
    return p.communicate()


@contextmanager
def group_process(cmd: list[str], **kw):
    """`popen_group` for the body of a with-block; the group is killed on leaving it."""
    p = popen_group(cmd, **kw)
    try:
        yield p
    finally:
        kill_group(p)


def run_in_group(cmd: list[str], timeout: float, *, cwd=REPO, env=None, merge_stderr: bool = False,
                 on_timeout: Optional[Callable[[str, Optional[str]], None]] = None) -> subprocess.CompletedProcess:
    """Run cmd in its own process group (text; stderr into stdout with merge_stderr). On time-out
    kill the whole group, then call on_timeout(stdout, stderr) (which may raise, e.g. pytest.fail);
    without one, return what it wrote (the returncode then is the kill's)."""
    p = popen_group(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = kill_group(p)
        if on_timeout is not None:
            on_timeout(out, err)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def run_group(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """Run cmd in its own process group (stdout and stderr together, as text); on time-out kill
    the whole group and return what it wrote (returncode then is the kill's)."""
    return run_in_group(cmd, timeout, merge_stderr=True, **kw)


def run_cli(args: list[str], timeout: float = 240, env_extra=None) -> subprocess.CompletedProcess:
    """Run `amoe-serve` in its own process group; kill the whole group on time-out."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(env_extra or {})

    def timed_out(out, err):
        raise AssertionError(f"amoe-serve {' '.join(args)} timed out\n{err[-3000:]}")

    return run_in_group([sys.executable, "-m", "amoe_serve.cli", *args], timeout, env=env, on_timeout=timed_out)


async def settled_stats(address: tuple[str, int], token: str) -> dict:
    """A data plane's link stats once nothing is running or waiting, with fresh rank counters."""
    import asyncio

    from amoe_serve.link.client import LinkClient
    c = LinkClient(*address, token)
    try:
        for _ in range(100):
            s = await c.stats()
            if s["gateway"]["running"] == 0 and s["gateway"]["waiting"] == 0:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.6)  # rank counters are refreshed every 0.5 s
        return await c.stats()
    finally:
        await c.close()


def job_processes(job: str) -> dict[int, str]:
    """pid -> command line of every live process carrying this job's SLURM_JOB_ID (Slurm puts it
    in the environment of the batch script and of every step; all children inherit it). The
    nodes share this machine's pid namespace, so this sees every node."""
    out = {}
    needle = f"SLURM_JOB_ID={job}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0") and alive(int(d.name)):
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return out
