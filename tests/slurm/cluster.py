"""A private single-node Slurm cluster for tests: writes slurm.conf into a folder, starts
slurmctld and slurmd in the foreground (-D) as children of this process, waits for the node
to be idle, and stops both by pid.

Debian's `slurm-wlm` runs without munge or systemd with auth/none + cred/none,
proctrack/linuxproc and task/none; the node is `hostname -s`. Usable by hand too:
`python tests/slurm/cluster.py DIR` starts a cluster and prints the SLURM_CONF to export.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from amoe_serve.serving.attach import free_port


def which(tool: str) -> str | None:
    """Daemons live in /usr/sbin, which a non-login PATH may lack."""
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/local/sbin")


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return max(512, int(line.split()[1]) // 1024 - 512)
    return 1024


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        user = os.environ.get("USER") or "root"
        if os.geteuid() == 0:
            user = "root"
        # Job ids must not repeat across runs on one machine: MPICH names its shared-memory
        # segment after the PMI job id ("<job>.<step>"), and a segment left by a killed job
        # with the same id would be attached by a new one.
        first_job_id = 1000 + (int(time.time() * 1000) + os.getpid()) % 60_000_000
        self.conf.write_text(f"""\
ClusterName=amoeci
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
FirstJobId={first_job_id}
KillWait=30
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={_mem_mb()} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        # Some builds read cgroup.conf even with task/none + proctrack/linuxproc: keep it inert.
        (r / "cgroup.conf").write_text("CgroupPlugin=disabled\n" if _has_disabled_cgroup() else "")

    def start(self, timeout: float = 60.0) -> None:
        self.write_conf()
        log = open(self.root / "log" / "daemons.out", "ab")
        self.procs["slurmctld"] = subprocess.Popen(
            [which("slurmctld"), "-D", "-i", "-f", str(self.conf)], env=self.env, stdout=log, stderr=log,
            start_new_session=True)
        self.procs["slurmd"] = subprocess.Popen(
            [which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node], env=self.env, stdout=log,
            stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{name} exited with code {p.returncode}:\n{self.logs()}")
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True)
            state = r.stdout.strip()
            if state in ("idle", "mix", "alloc"):
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the Slurm node did not become idle in {timeout:.0f} s (state {state!r}):\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(out)

    def stop(self) -> None:
        """SIGTERM each daemon by pid, SIGKILL after 15 s."""
        for name in ("slurmd", "slurmctld"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


def _has_disabled_cgroup() -> bool:
    """`CgroupPlugin=disabled` exists from Slurm 23.x; older ones reject the key."""
    try:
        out = subprocess.run([which("slurmd") or "slurmd", "-V"], capture_output=True, text=True).stdout
        major = int(out.split()[1].split(".")[0])
        return major >= 23
    except (OSError, ValueError, IndexError):
        return False


def available() -> str | None:
    """None when Slurm is usable here, else why not."""
    for tool in ("slurmctld", "slurmd", "sbatch", "srun", "scancel", "sinfo", "squeue"):
        if which(tool) is None:
            return f"{tool} is not installed (apt-get install slurm-wlm)"
    if sys.platform != "linux":
        return "Slurm tests need Linux"
    if os.geteuid() != 0:
        return "the Slurm tests start their own slurmd, which needs root"
    return None


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # for sigwait
    c = SlurmCluster(Path(sys.argv[1]))
    c.start()
    print(f"export SLURM_CONF={c.conf}  # slurmctld pid {c.procs['slurmctld'].pid}, slurmd pid {c.procs['slurmd'].pid}")
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        c.stop()
