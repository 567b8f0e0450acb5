"""The one process-group kill and the one signal trap (amoe_serve.procs)."""

import os
import signal
import subprocess
import sys
import time

from amoe_serve.procs import alive, group_alive, kill_group, trap_signals

# A group leader that ends on SIGTERM, with a child that ignores it (a hung rank); the child
# prints its pid once it ignores SIGTERM.
STUBBORN = """sh -c 'trap "" TERM; echo $$; exec sleep 60' & exec sleep 60"""


def _group(script: str) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    return p, int(p.stdout.readline())


def test_kill_group_terms_then_kills_what_is_left():
    p, child = _group(STUBBORN)
    t0 = time.monotonic()
    kill_group(p, grace=0.5)
    assert p.returncode == -signal.SIGTERM  # the leader took the SIGTERM
    assert 0.5 <= time.monotonic() - t0 < 5  # the grace period, not more
    assert not alive(child) and not group_alive(p.pid)  # the child that ignored it got SIGKILL
    p.stdout.close()


def test_kill_group_without_grace_kills_at_once_and_is_idempotent():
    p, child = _group("sleep 60 & echo $!; exec sleep 60")
    kill_group(p, grace=0)
    assert p.returncode == -signal.SIGKILL and not alive(child)
    kill_group(p)  # the group is gone: nothing to do, no error
    p.stdout.close()


def test_trap_signals_routes_and_restores():
    got = []
    before = signal.getsignal(signal.SIGTERM)
    with trap_signals(lambda signum, frame: got.append(signum)) as retrap:
        os.kill(os.getpid(), signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as ray.init does
        retrap()
        os.kill(os.getpid(), signal.SIGTERM)
    assert got == [signal.SIGTERM, signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before


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
