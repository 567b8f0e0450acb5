"""A Slurm cluster of N "nodes" on one machine: each node is a network namespace with its own
hostname, /etc/hosts and /dev/shm, an address on a private bridge, and its own slurmd;
slurmctld runs on the first node.

Names owned by this project (and nothing else is ever touched or removed):

  namespaces   amoe-n0 .. amoe-n<N-1>        (`ip netns`; hostnames the same)
  bridge       amoe-br0, 10.213.7.1/24 in the root namespace (so sbatch and HTTP from here reach
               the nodes)
  veth pairs   amoe-v<i> (root side, on the bridge)  <->  eth0 inside amoe-n<i>, 10.213.7.<10+i>
  /etc/netns/amoe-n<i>/hosts   bind-mounted over /etc/hosts on the node (names of the nodes, so
               hostnames resolve on every node like on a real cluster)

Every daemon runs as `nsenter --net=/run/netns/amoe-n<i> unshare --uts --mount sh -c 'hostname
amoe-n<i>; mount --bind /etc/netns/amoe-n<i>/hosts /etc/hosts; mount tmpfs /dev/shm; exec slurmd
...'` (nsenter, unshare and sh exec, so the pid we hold is the daemon's).
Stopping is by pid, then by namespace (every pid `ip netns pids` lists), then the namespaces,
links and /etc/netns folders are removed. `cleanup_stale()` does the same for whatever a
crashed earlier run left (only names matching the prefixes above).

By hand: `scripts/cluster.sh up 2` / `status` / `down` (see that script).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

NS_PREFIX = "amoe-n"
BRIDGE = "amoe-br0"
VETH_PREFIX = "amoe-v"
SUBNET = "10.213.7"
HOST_ADDR = f"{SUBNET}.1"
NODE_IFACE = "eth0"
NS_RE = re.compile(rf"^{re.escape(NS_PREFIX)}\d+$")
VETH_RE = re.compile(rf"^{re.escape(VETH_PREFIX)}\d+$")
SLURMCTLD_PORT = 6817  # per namespace: no clash with anything outside
SLURMD_PORT = 6818
CPUS_PER_NODE = 4      # advertised (SlurmdParameters=config_overrides); the machine may have fewer
MEM_PER_NODE_MB = 4096


def which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/local/sbin:/usr/bin")


def node_name(i: int) -> str:
    return f"{NS_PREFIX}{i}"


def node_addr(i: int) -> str:
    return f"{SUBNET}.{10 + i}"


def _run(*cmd: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def available() -> str | None:
    """None when a namespace cluster can be built here, else why not."""
    if sys.platform != "linux":
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (ip netns, veth, a bridge, slurmd)"
    for tool in ("ip", "nsenter", "unshare", "mount", "slurmctld", "slurmd", "sbatch", "srun", "scancel", "sinfo",
                 "squeue", "scontrol"):
        if which(tool) is None:
            return f"{tool} is not installed"
    r = subprocess.run([which("ip"), "netns", "list"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns does not work here: {r.stderr.strip()}"
    return None


# --------------------------------------------------------------------------- stale state


def our_namespaces() -> list[str]:
    r = _run(which("ip"), "netns", "list", check=False)
    return sorted({line.split()[0] for line in r.stdout.splitlines() if line.split() and NS_RE.match(line.split()[0])})


def _our_links() -> list[str]:
    r = _run(which("ip"), "-o", "link", "show", check=False)
    out = []
    for line in r.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if name == BRIDGE or VETH_RE.match(name):
                out.append(name)
    return out


def netns_pids(ns: str) -> list[int]:
    r = _run(which("ip"), "netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit() and int(p) != os.getpid()]


def kill_namespace_processes(ns: str, sig: int = signal.SIGKILL, wait_s: float = 5.0) -> list[int]:
    """Signal every process whose network namespace is `ns`; returns the pids signalled."""
    pids = netns_pids(ns)
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and netns_pids(ns):
        time.sleep(0.1)
    return pids


def cleanup_stale() -> list[str]:
    """Remove every namespace, link and /etc/netns folder with this project's prefixes (their
    processes first, by pid). Returns what was removed."""
    removed = []
    for ns in our_namespaces():
        for sig in (signal.SIGTERM, signal.SIGKILL):
            kill_namespace_processes(ns, sig, wait_s=3.0)
        _run(which("ip"), "netns", "delete", ns, check=False)
        removed.append(ns)
    for link in _our_links():
        if link != BRIDGE:
            _run(which("ip"), "link", "delete", link, check=False)
            removed.append(link)
    if BRIDGE in _our_links():
        _run(which("ip"), "link", "delete", BRIDGE, check=False)
        removed.append(BRIDGE)
    etc = Path("/etc/netns")
    if etc.is_dir():
        for d in etc.iterdir():
            if NS_RE.match(d.name):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(str(d))
        try:
            etc.rmdir()  # only if empty: someone else's entries stay
        except OSError:
            pass
    return removed


# --------------------------------------------------------------------------- the cluster


def _has_disabled_cgroup() -> bool:
    try:
        out = subprocess.run([which("slurmd") or "slurmd", "-V"], capture_output=True, text=True).stdout
        return int(out.split()[1].split(".")[0]) >= 23
    except (OSError, ValueError, IndexError):
        return False


class NetCluster:
    def __init__(self, root: Path, nodes: int = 2):
        if not 1 <= nodes <= 8:
            raise ValueError("1..8 nodes")
        self.root = Path(root).resolve()
        self.n = nodes
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.names = [node_name(i) for i in range(nodes)]
        self.addrs = [node_addr(i) for i in range(nodes)]

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm client commands run from the root namespace."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    # ---------------------------------------------------------------- network
    def create_network(self) -> None:
        ip = which("ip")
        _run(ip, "link", "add", BRIDGE, "type", "bridge")
        _run(ip, "addr", "add", f"{HOST_ADDR}/24", "dev", BRIDGE)
        _run(ip, "link", "set", BRIDGE, "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in zip(self.names, self.addrs))
        for i, (ns, addr) in enumerate(zip(self.names, self.addrs)):
            _run(ip, "netns", "add", ns)
            veth, peer = f"{VETH_PREFIX}{i}", f"amoe-p{i}"
            _run(ip, "link", "add", veth, "type", "veth", "peer", "name", peer)
            _run(ip, "link", "set", peer, "netns", ns)
            _run(ip, "link", "set", veth, "master", BRIDGE)
            _run(ip, "link", "set", veth, "up")
            _run(ip, "-n", ns, "link", "set", peer, "name", NODE_IFACE)
            _run(ip, "-n", ns, "addr", "add", f"{addr}/24", "dev", NODE_IFACE)
            _run(ip, "-n", ns, "link", "set", NODE_IFACE, "up")
            _run(ip, "-n", ns, "link", "set", "lo", "up")
            d = Path("/etc/netns") / ns
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts").write_text(hosts)
            (d / "hostname").write_text(ns + "\n")

    def link(self, i: int, up: bool) -> None:
        """The node's cable: the root side of its veth, down or up (a link cut)."""
        _run(which("ip"), "link", "set", f"{VETH_PREFIX}{i}", "up" if up else "down")

    # ---------------------------------------------------------------- slurm
    def write_conf(self) -> None:
        r = self.root
        for d in ("state", "log", "run", *(f"spool/{n}" for n in self.names)):
            (r / d).mkdir(parents=True, exist_ok=True)
        first_job_id = 1000 + (int(time.time() * 1000) + os.getpid()) % 60_000_000
        nodes = "".join(f"NodeName={n} NodeAddr={a} NodeHostname={n} CPUs={CPUS_PER_NODE} "
                        f"RealMemory={MEM_PER_NODE_MB} State=UNKNOWN\n" for n, a in zip(self.names, self.addrs))
        self.conf.write_text(f"""\
ClusterName=amoenet
SlurmctldHost={self.names[0]}({self.addrs[0]})
SlurmctldPort={SLURMCTLD_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
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
SlurmdParameters=config_overrides
ReturnToService=2
FirstJobId={first_job_id}
KillWait=30
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=20
MessageTimeout=10
InactiveLimit=0
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}
SlurmdPidFile={r / 'run'}/slurmd-%n.pid
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log'}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
{nodes}PartitionName=debug Nodes={','.join(self.names)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        (r / "cgroup.conf").write_text("CgroupPlugin=disabled\n" if _has_disabled_cgroup() else "")

    def _in_node(self, i: int, argv: list[str], shm: bool = True) -> list[str]:
        """argv run on node i: its network namespace, a UTS namespace with its hostname, and a
        mount namespace with the node's /etc/hosts and (shm) a private /dev/shm. (Not `ip netns
        exec`, which remounts /sys and so hides the cgroup mounts slurmd wants.)"""
        ns = self.names[i]
        script = (f'hostname "$0" && mount --bind /etc/netns/{ns}/hosts /etc/hosts'
                  + (' && mount -t tmpfs -o size=1g,mode=1777 amoe-shm /dev/shm' if shm else '')
                  + ' && exec "$@"')
        return [which("nsenter"), f"--net=/run/netns/{ns}", which("unshare"), "--uts", "--ipc", "--mount",
                "--propagation", "private", "sh", "-c", script, ns, *argv]

    def node_exec(self, i: int, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """Run a short command on node i (its network, hostname and /etc/hosts)."""
        return subprocess.run(self._in_node(i, argv, shm=False), capture_output=True, text=True, **kw)

    def _daemon(self, name: str, i: int, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(self._in_node(i, argv), env=self.env, stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def start(self, timeout: float = 60.0) -> None:
        cleanup_stale()
        self.write_conf()
        try:
            self.create_network()
            self._daemon("slurmctld", 0, [which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            for i, n in enumerate(self.names):
                self._daemon(f"slurmd-{n}", i, [which("slurmd"), "-D", "-f", str(self.conf), "-N", n])
            self.save_state()
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def node_states(self) -> dict[str, str]:
        r = subprocess.run([which("sinfo"), "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True,
                           text=True, timeout=20)
        return dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {p.returncode}:\n{self.logs()}")
            try:
                states = self.node_states()
            except subprocess.TimeoutExpired:
                states = {}
            if len(states) == self.n and all(s in ("idle", "mix", "alloc") for s in states.values()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the nodes did not become idle in {timeout:.0f} s ({states}):\n{self.logs()}")

    def save_state(self) -> None:
        (self.root / "cluster.json").write_text(json.dumps({
            "nodes": self.names, "addrs": self.addrs, "conf": str(self.conf),
            "pids": {k: p.pid for k, p in self.procs.items()}}, indent=1))

    def logs(self, lines: int = 30) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def restart_slurmd(self, i: int, timeout: float = 60.0) -> None:
        """A node that was "crashed" (kill_node) boots again: a fresh slurmd (new mount, UTS and
        IPC namespaces, an empty /dev/shm); Slurm returns it to service (ReturnToService=2)."""
        name = f"slurmd-{self.names[i]}"
        old = self.procs.pop(name, None)
        if old is not None and old.poll() is None:
            raise RuntimeError(f"{name} still runs")
        if old is not None:
            old.wait()
        self._daemon(name, i, [which("slurmd"), "-D", "-f", str(self.conf), "-N", self.names[i]])
        self.save_state()
        self.wait_idle(timeout)

    def kill_node(self, i: int) -> list[int]:
        """A node crash: SIGKILL every process in the node's network namespace (its slurmd,
        slurmstepds, ranks, Ray). Returns the pids killed."""
        pids = kill_namespace_processes(self.names[i], signal.SIGKILL)
        p = self.procs.get(f"slurmd-{self.names[i]}")
        if p is not None:
            p.wait(timeout=10)
        return pids

    def node_of_pid(self, pid: int) -> str | None:
        """The node (namespace name) a process runs on, or None (root namespace / gone)."""
        try:
            ino = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            return None
        for ns in self.names:
            try:
                if os.stat(f"/run/netns/{ns}").st_ino == ino:
                    return ns
            except OSError:
                continue
        return None

    # ---------------------------------------------------------------- teardown
    def scancel_all(self, wait_s: float = 45.0) -> None:
        """Every job of this private controller is ours."""
        subprocess.run([which("scancel"), "--full", "--quiet", "--partition", "debug"], env=self.env,
                       capture_output=True, timeout=20)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            r = subprocess.run([which("squeue"), "-h", "-o", "%i"], env=self.env, capture_output=True, text=True,
                               timeout=20)
            if r.returncode != 0 or not r.stdout.strip():
                return
            time.sleep(1)

    def stop(self) -> None:
        """Daemons by pid (SIGTERM, 10 s, SIGKILL), then every process left in each node's
        namespace, then the namespaces, links and /etc/netns entries."""
        for name in [k for k in self.procs if k.startswith("slurmd")] + ["slurmctld"]:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        for ns in self.names:
            if ns in our_namespaces():
                kill_namespace_processes(ns, signal.SIGKILL)
        cleanup_stale()


def stop_from_state(root: Path) -> None:
    """`cluster.sh down`: the daemons recorded in ROOT/cluster.json (by pid, if they still are
    slurm daemons), then everything with the project's prefixes."""
    f = Path(root) / "cluster.json"
    if f.exists():
        st = json.loads(f.read_text())
        for name, pid in st.get("pids", {}).items():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"slurm" in cmd:
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in st.get("pids", {}).values()):
            time.sleep(0.2)
        f.unlink()
    cleanup_stale()


def main(argv: list[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="scripts/cluster.sh")
    ap.add_argument("action", choices=["up", "down", "status"])
    ap.add_argument("nodes", type=int, nargs="?", default=2)
    ap.add_argument("--root", default="/tmp/amoe-cluster")
    a = ap.parse_args(argv)
    why = available()
    if why:
        print(f"cluster: {why}", file=sys.stderr)
        return 2
    root = Path(a.root)
    if a.action == "up":
        stop_from_state(root)
        root.mkdir(parents=True, exist_ok=True)
        c = NetCluster(root, a.nodes)
        c.start()
        for p in c.procs.values():  # they run on; `down` stops them by the pids in cluster.json
            p.returncode = 0
        print(f"export SLURM_CONF={c.conf}")
        for n, ad in zip(c.names, c.addrs):
            print(f"# {n} {ad}  (a shell on it: nsenter --net=/run/netns/{n} unshare --uts sh -c 'hostname {n}; exec bash')")
        return 0
    if a.action == "down":
        stop_from_state(root)
        print("cluster: down")
        return 0
    nss = our_namespaces()
    print(f"namespaces: {' '.join(nss) or '-'}")
    for ns in nss:
        print(f"  {ns}: {len(netns_pids(ns))} process(es)")
    if (root / "slurm.conf").exists() and nss:
        r = subprocess.run([which("sinfo"), "-N"], env=dict(os.environ, SLURM_CONF=str(root / "slurm.conf")),
                           capture_output=True, text=True, timeout=20)
        print(r.stdout or r.stderr, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
