#!/usr/bin/env bash
# A Slurm cluster of network-namespace "nodes" on this machine (root): amoe-n0 .. amoe-n<N-1>,
# each with its own hostname, address (10.213.7.10+i on the bridge amoe-br0), /dev/shm and
# slurmd; slurmctld on amoe-n0. See tests/cluster/netcluster.py and docs/MULTINODE.md.
#
#   sudo scripts/cluster.sh up [N]       # N = 2 (default) or 3...; prints the SLURM_CONF to export
#   sudo scripts/cluster.sh status
#   sudo scripts/cluster.sh down         # stops the daemons by pid, removes the namespaces
#
# State lives in AMOE_CLUSTER_ROOT (default /tmp/amoe-cluster). `up` first removes whatever an
# earlier run left (namespaces amoe-n*, links amoe-br0 / amoe-v*, /etc/netns/amoe-n*; nothing else).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${AMOE_PYTHON:-$PWD/.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m tests.cluster.netcluster "${1:-status}" "${2:-2}" --root "${AMOE_CLUSTER_ROOT:-/tmp/amoe-cluster}"
