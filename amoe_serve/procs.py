"""Process helpers for launchers: find and end every descendant by pid, end a process group
(`kill_group`), trap SIGINT/SIGTERM for a teardown (`trap_signals`)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> list[int]:
    """Pids of every live process below `root` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                children.setdefault(_ppid(int(d.name)), []).append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_until(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def terminate(pids: list[int], grace: float = 5.0) -> None:
    """Processes that are in no group of ours (what Ray left behind): SIGTERM, wait up to
    `grace`, then SIGKILL whatever is left and wait up to `grace` again."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        _signal_pids(pids, sig)
        _wait_until(lambda: not any(alive(p) for p in pids), grace)


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is still in process group `pgid` (Linux /proc)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z" and fields[2] == str(pgid):
                return True
    return False


def kill_group(p: subprocess.Popen, grace: float = 3.0) -> None:
    """End the process group that `p` leads (started with start_new_session=True: mpiexec and
    its ranks, a server and its workers): SIGTERM to the group, up to `grace` s for p and the
    rest of the group to exit, then SIGKILL to whatever of the group is left, and p reaped.
    grace=0 skips SIGTERM: SIGKILL at once (a dead job's leftovers; a test's time-out). The one
    process-group kill of the launchers, `up`, the baselines and the tests."""
    def signal_group(sig: int) -> bool:
        try:
            os.killpg(p.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):  # the group is gone (its id may be reused)
            return False

    if grace > 0:
        if not signal_group(signal.SIGTERM):
            p.poll()
            return
        if _wait_until(lambda: p.poll() is not None and not group_alive(p.pid), grace):
            return
    signal_group(signal.SIGKILL)
    _wait_until(lambda: p.poll() is not None and not group_alive(p.pid), max(grace, 1.0))


def stop_tree(proc: subprocess.Popen, wait_s: float) -> None:
    """SIGTERM a launched process (e.g. `amoe-serve up`, which tears down what it started),
    give it wait_s to shut down, then SIGKILL it and whatever it left behind (by parentage:
    Ray's daemons leave its process group)."""
    kids = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            pass
    _signal_pids([pid for pid in [proc.pid, *kids] if alive(pid)], signal.SIGKILL)


@contextmanager
def trap_signals(on_signal: Callable[[int, object], None],
                 signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[Callable[[], None]]:
    """Route `signals` to on_signal(signum, frame) inside the block and restore the previous
    handlers on leaving it (after the block's own teardown). Yields `retrap()`, which installs
    on_signal again: ray.init replaces the SIGTERM handler, and teardown must stay ours."""
    def retrap() -> dict:
        return {sig: signal.signal(sig, on_signal) for sig in signals}

    old = retrap()
    try:
        yield retrap
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def run_with_timeout(fn: Callable[[], object], timeout: float) -> bool:
    """Run fn in a daemon thread; False if it had not returned after `timeout` seconds."""
    th = threading.Thread(target=fn, daemon=True)
    th.start()
    th.join(timeout)
    return not th.is_alive()


def _mapped_shm() -> set[str]:
    names: set[str] = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                for line in (d / "maps").read_text().splitlines():
                    i = line.find("/dev/shm/")
                    if i >= 0:
                        names.add(line[i + 9:].split(" ")[0])
            except OSError:
                continue
    return names


def clean_orphaned_mpi_shm(shm: Path = Path("/dev/shm")) -> int:
    """Unlink MPICH shared-memory segments no live process maps: a killed MPI job leaves them
    behind (they hold RAM). A segment in use is never touched. Returns how many were removed."""
    try:
        files = [f for f in shm.iterdir() if f.name.startswith("mpich_shm_")]
    except OSError:
        return 0
    if not files:
        return 0
    live = _mapped_shm()
    removed = 0
    for f in files:
        if f.name not in live:
            try:
                f.unlink()
                removed += 1
            except OSError:
                pass
    return removed


def precise_sleeps(slack_ns: int = 1000) -> bool:
    """Shrink this thread's timer slack (Linux prctl PR_SET_TIMERSLACK) so the poll loops'
    short back-off sleeps last what they ask: with the default 50 µs slack a 16 µs sleep takes
    ~70 µs, and every message hop between ranks pays it. False where it is not supported."""
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl(29, int(slack_ns), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


_ALLOWED_BEFORE_BIND: set[int] | None = None


def bind_to_core(index: int) -> int | None:
    """Pin this process to the index-th core it may run on (modulo their count; the set honours
    a launcher's or cgroup's own restriction); returns the core, None where not supported."""
    global _ALLOWED_BEFORE_BIND
    try:
        allowed = sorted(os.sched_getaffinity(0))
        core = allowed[index % len(allowed)]
        os.sched_setaffinity(0, {core})
        _ALLOWED_BEFORE_BIND = set(allowed)
        return core
    except (AttributeError, OSError):
        return None


def ranks_on_this_node(world_size: int) -> int:
    """How many ranks of this job share this node: from the launcher's environment (Hydra's
    MPI_LOCALNRANKS, Slurm's SLURM_STEP_TASKS_PER_NODE with SLURM_NODEID), else all of them."""
    n = os.environ.get("MPI_LOCALNRANKS")
    if n and n.isdigit():
        return int(n)
    per_node, node = os.environ.get("SLURM_STEP_TASKS_PER_NODE"), os.environ.get("SLURM_NODEID")
    if per_node and node and node.isdigit():
        counts: list[int] = []
        for part in per_node.split(","):  # "2(x3),1": 2 tasks on each of 3 nodes, then 1
            n_s, _, rep = part.partition("(x")
            if n_s.isdigit():
                counts += [int(n_s)] * (int(rep.rstrip(")")) if rep.rstrip(")").isdigit() else 1)
        if int(node) < len(counts):
            return counts[int(node)]
    return world_size


def cores_available() -> int:
    """Cores this job may use on this node: the set before bind_to_core narrowed it to one."""
    return len(_ALLOWED_BEFORE_BIND or os.sched_getaffinity(0))


def memory_mb() -> dict[str, float]:
    """This process's resident memory now and at its peak (VmRSS, VmHWM), and the anonymous
    part (RssAnon: what it allocated, not the checkpoint pages it maps), in MB."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                out[{"VmRSS": "rss_mb", "VmHWM": "peak_rss_mb", "RssAnon": "rss_anon_mb"}[key]] = int(rest.split()[0]) / 1024
    except OSError:  # not Linux: peak only
        import resource

        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out
