#!/usr/bin/env bash
#SBATCH --job-name=amoe-serve
#SBATCH --nodes=1
#SBATCH --ntasks=4
#SBATCH --time=01:00:00
#SBATCH --signal=B:TERM@60
#SBATCH --no-requeue
#SBATCH --output=amoe-serve-%j.out
#
# AMoE-serve on a Slurm allocation: Ray head on the first node (Ray workers on the others),
# the MPI data plane across the allocation with `srun --mpi=pmi2` (gateway rank 0 + A attention
# + E expert ranks), the Serve ingress on the head, and the endpoint URL in the job output and
# in a file. scancel, the time limit (SIGTERM 60 s before it, --signal above) or any component
# dying tears everything down. A failed node ends the job (--no-requeue: a requeued job would come
# back with a new endpoint; pass --requeue to sbatch to have Slurm start it again).
#
#   sbatch [SBATCH OPTIONS] slurm/launch.sh [--config configs/slurm/cpu.yaml] [--model DIR]
#          [--port N|auto] [--endpoint-file F] [--job-dir D] [KEY=VALUE ...]
#
# Every #SBATCH line above is overridden by the same option on the sbatch command line. The
# config (relative paths are relative to the directory sbatch ran in) is an ordinary
# amoe-serve config plus an optional `slurm:` section (distribution, node_of_rank,
# ready_timeout_s, ray_num_cpus, gpus_per_node); KEY=VALUE overrides either (slurm.KEY=...).
# The job needs 1 + A + E tasks (4 for configs/slurm/cpu.yaml); with fewer allocated tasks the
# data-plane step is started with --overcommit. Environment knobs: AMOE_CONFIG, AMOE_MODEL,
# AMOE_PORT, AMOE_ENDPOINT_FILE, AMOE_JOB_DIR, AMOE_PYTHON, AMOE_HEAD_ADDR, AMOE_ENDPOINT_HOST,
# AMOE_RAY_PORT, AMOE_SRUN_ARGS (extra options of the data-plane srun, e.g. --gpus-per-task=1),
# AMOE_MPI_NET (auto | tcp | ofi | default: how MPI ranks on different nodes talk, see below),
# AMOE_NODE_WATCH=0 (no watch for lost nodes), AMOE_DOWN_DRAIN_S (3: seconds the ingress stays up,
# answering 503 and failing in-flight requests, after a lost node stopped the gateway).
#
# Several nodes (sbatch -N 2 ...): nothing is assumed to be local. The head's address is the one
# Slurm reaches it by (its NodeAddr; AMOE_HEAD_ADDR overrides), Ray, the gateway link and the
# endpoint URL use it; every node gets its own Ray temp dir; each node removes the MPICH
# shared-memory segments its ranks leave. MPI between nodes (MPICH's own shared memory is used
# within a node only): AMOE_MPI_NET=tcp is libfabric's tcp provider (MPIR_CVAR_CH4_NETMOD=ofi,
# FI_PROVIDER=tcp); ofi is libfabric with its own provider choice; default leaves MPICH alone
# (the mpich wheel picks UCX). auto (the default) is tcp for nodes that share one kernel
# (containers or network namespaces on one machine: one boot id), where UCX takes the nodes for
# one host and uses shared memory between them, and default otherwise. Why not UCX over TCP:
# its ~4 KB worker addresses go through PMI in ~1 KB segments, and Slurm's pmi2 plugin (22.05)
# reads a PMI-1 request with one 1024-byte read, so a segment whose line is longer breaks
# MPI_Init now and then ("mpi/pmi2: value not properly terminated"); libfabric's are 16 bytes.
set -uo pipefail

log() { echo "[amoe-serve $(date +%H:%M:%S)] $*"; }
fail() {
  local msg
  msg="[amoe-serve $(date +%H:%M:%S)] ERROR: $*"
  echo "$msg" >&2
  [ /proc/$$/fd/1 -ef /proc/$$/fd/2 ] || echo "$msg"  # the job output too, when --error splits it
  exit 1
}
usage() { sed -n '2,/^set -uo/p' "$0" | sed -e '/^set -uo/d' -e 's/^# \{0,1\}//'; exit 0; }

CONFIG=${AMOE_CONFIG:-configs/slurm/cpu.yaml}
MODEL=${AMOE_MODEL:-}
PORT=${AMOE_PORT:-}
ENDPOINT_FILE=${AMOE_ENDPOINT_FILE:-}
JOB_DIR=${AMOE_JOB_DIR:-}
OVERRIDES=()
while [ $# -gt 0 ]; do
  case $1 in
    --config) CONFIG=$2; shift 2 ;;
    --config=*) CONFIG=${1#*=}; shift ;;
    --model) MODEL=$2; shift 2 ;;
    --model=*) MODEL=${1#*=}; shift ;;
    --port) PORT=$2; shift 2 ;;
    --port=*) PORT=${1#*=}; shift ;;
    --endpoint-file) ENDPOINT_FILE=$2; shift 2 ;;
    --endpoint-file=*) ENDPOINT_FILE=${1#*=}; shift ;;
    --job-dir) JOB_DIR=$2; shift 2 ;;
    --job-dir=*) JOB_DIR=${1#*=}; shift ;;
    -h|--help) usage ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *) fail "unknown argument '$1' (see: bash slurm/launch.sh --help)" ;;
  esac
done

[ -n "${SLURM_JOB_ID:-}" ] || fail "not inside a Slurm job: submit it with 'sbatch slurm/launch.sh'"
SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
cd "$SUBMIT_DIR" || fail "cannot enter the submit directory $SUBMIT_DIR"

# --------------------------------------------------------------------------- teardown
# Components are background children of this shell, stopped by their pids: SIGTERM, a grace
# period, then SIGKILL for each and every descendant recorded before signalling.
declare -A PIDS=()          # component name -> pid
ORDER=()                    # start order
TORN_DOWN=0

descendants() {  # pid -> its live descendants, by /proc parentage
  ps -e -o pid= -o ppid= 2>/dev/null | awk -v root="$1" '
    { kids[$2] = kids[$2] " " $1 }
    END { n = split(kids[root], q, " "); i = 1
          while (i <= n) { p = q[i++]; print p; m = split(kids[p], c, " "); for (j = 1; j <= m; j++) q[++n] = c[j] } }'
}

TREES=""  # every pid of every component, recorded before signalling

record_trees() {
  local name pid
  for name in "${ORDER[@]}"; do
    pid=${PIDS[$name]:-}
    [ -n "$pid" ] && TREES="$TREES $pid $(descendants "$pid" | tr '\n' ' ')"
  done
}

term_and_wait() {  # grace_s name... : SIGTERM each, wait until all are gone or grace_s passed
  local grace=$1 name pid left waited=0
  shift
  for name in "$@"; do
    pid=${PIDS[$name]:-}
    [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null
  done
  while [ "$waited" -lt $((grace * 5)) ]; do
    left=0
    for name in "$@"; do
      pid=${PIDS[$name]:-}
      [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && left=1
    done
    [ "$left" = 0 ] && break
    sleep 0.2
    waited=$((waited + 1))
  done
}

# Bounded (about 20 s, within Slurm's KillWait): the ingress first, so Serve shuts down while
# Ray is still up, then the data plane (srun forwards SIGTERM to every rank) and Ray together,
# then SIGKILL for whatever is left of any of them.
teardown() {
  [ "$TORN_DOWN" = 1 ] && return
  TORN_DOWN=1
  trap '' TERM INT
  [ -n "${ENDPOINT_FILE:-}" ] && rm -f "$ENDPOINT_FILE"
  if [ "${#ORDER[@]}" -gt 0 ]; then
    log "tearing down: ${ORDER[*]}"
    record_trees
    term_and_wait 8 ingress
    term_and_wait 10 data-plane ray-workers ray-head
    record_trees
    local p
    for p in $TREES; do  # still ours? (a pid of this job carries its SLURM_JOB_ID)
      grep -qzx "SLURM_JOB_ID=$SLURM_JOB_ID" "/proc/$p/environ" 2>/dev/null && kill -KILL "$p" 2>/dev/null
    done
    # Ranks of this node are children of slurmstepd, not of srun: one stuck in MPI on a lost peer
    # outlives a killed srun until Slurm gives up on the lost node. Every process of this node
    # (this network namespace: nodes that share a kernel also share /proc) that carries this
    # job's id, and is not this script, goes too.
    local net
    net=$(readlink /proc/$$/ns/net)
    for p in $(grep -lszx "SLURM_JOB_ID=$SLURM_JOB_ID" /proc/[0-9]*/environ | sed 's|/proc/\([0-9]*\)/environ|\1|'); do
      [ "$p" = "$$" ] || [ "$p" = "$BASHPID" ] && continue
      [ "$(readlink "/proc/$p/ns/net" 2>/dev/null)" = "$net" ] && kill -KILL "$p" 2>/dev/null
    done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  fi
  [ -n "${RAY_TMP:-}" ] && rm -rf "$RAY_TMP"
  remove_stale_shm
  log "stopped"
}
# MPICH keeps its shared-memory segment in /dev/shm, named after the PMI job id; ranks that
# were killed leave it behind. Remove the ones this job wrote that no process has open.
remove_stale_shm() {
  [ -n "${SHM_MARK:-}" ] && [ -e "$SHM_MARK" ] || return 0
  local f
  for f in /dev/shm/mpich_shm_*; do
    [ -O "$f" ] && [ "$f" -nt "$SHM_MARK" ] || continue
    find /proc/[0-9]*/fd -lname "$f*" 2>/dev/null | grep -q . || rm -f "$f"
  done
  rm -f "$SHM_MARK"
}
on_signal() {
  log "received SIG$1 (scancel or the time limit): stopping"
  exit "$2"
}
trap 'on_signal TERM 143' TERM
trap 'on_signal INT 130' INT
trap teardown EXIT

start() {  # name command... (in the background; stdin from /dev/null)
  local name=$1; shift
  "$@" </dev/null &
  PIDS[$name]=$!
  [[ " ${ORDER[*]} " == *" $name "* ]] || ORDER+=("$name")
}

# Sleep that a trapped signal interrupts at once.
nap() { sleep "$1" & wait $! 2>/dev/null; }

# --------------------------------------------------------------------------- python, nodes
PY=${AMOE_PYTHON:-}
if [ -z "$PY" ]; then
  for c in "$(command -v python3 || true)" "$(command -v python || true)" "$SUBMIT_DIR/.venv/bin/python"; do
    if [ -n "$c" ] && [ -x "$c" ] && "$c" -c 'import amoe_serve' 2>/dev/null; then PY=$c; break; fi
  done
fi
[ -n "$PY" ] && "$PY" -c 'import amoe_serve' 2>/dev/null \
  || fail "no python with amoe_serve installed: activate its venv before sbatch, or set AMOE_PYTHON"
BIN=$(dirname "$PY")
export PATH="$BIN:$PATH"
RAY=$BIN/ray; [ -x "$RAY" ] || RAY=$(command -v ray) || fail "the ray command is missing (pip install 'ray[serve]')"
if [ -x "$BIN/amoe-serve" ]; then AMOE=("$BIN/amoe-serve"); else AMOE=("$PY" -m amoe_serve.cli); fi

mapfile -t NODES < <(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname -s)}" 2>/dev/null)
[ "${#NODES[@]}" -gt 0 ] || NODES=("$(hostname -s)")
NNODES=${#NODES[@]}
HEAD_NODE=${NODES[0]}
# An address of this (the head) node that the other nodes reach: Slurm's NodeAddr for it when
# that is an address or resolves to a non-loopback one, else the first address of `hostname -I`.
head_addr() {
  local a
  a=$(scontrol show node "$HEAD_NODE" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
  if [ -n "$a" ] && ! [[ $a =~ ^[0-9.]+$ || $a == *:* ]]; then
    a=$(getent ahostsv4 "$a" 2>/dev/null | awk '{print $1; exit}')
  fi
  case $a in ""|127.*|::1) a=$(hostname -I 2>/dev/null | awk '{print $1}') ;; esac
  echo "${a:-$(hostname -f)}"
}
if [ "$NNODES" -eq 1 ]; then
  HEAD_ADDR=${AMOE_HEAD_ADDR:-127.0.0.1}
else
  HEAD_ADDR=${AMOE_HEAD_ADDR:-$(head_addr)}
fi

JOB_DIR=${JOB_DIR:-$SUBMIT_DIR/amoe-serve-$SLURM_JOB_ID}
ENDPOINT_FILE=${ENDPOINT_FILE:-$SUBMIT_DIR/amoe-serve-$SLURM_JOB_ID.endpoint}
mkdir -p "$JOB_DIR" && chmod 700 "$JOB_DIR" || fail "cannot create the job directory $JOB_DIR"
(umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$JOB_DIR/link.token") \
  || fail "cannot write the link token into $JOB_DIR"

log "job $SLURM_JOB_ID on ${NNODES} node(s): ${NODES[*]} (head $HEAD_NODE, $HEAD_ADDR); job dir $JOB_DIR"

# --------------------------------------------------------------------------- plan
PLAN_ARGS=()
[ -n "$MODEL" ] && PLAN_ARGS+=("model.path=$MODEL")
if [ "$PORT" = auto ]; then PORT=$("$PY" -m amoe_serve.serving.attach free-port); fi
[ -n "$PORT" ] && PLAN_ARGS+=("serving.port=$PORT")
CONFIG_ARGS=()
if [ -n "$CONFIG" ]; then
  [ -f "$CONFIG" ] || fail "config file not found: $CONFIG (relative to $SUBMIT_DIR)"
  CONFIG_ARGS=(--config "$CONFIG")
fi
PLAN=$("$PY" -m amoe_serve.serving.attach plan "${CONFIG_ARGS[@]}" --jobdir "$JOB_DIR" --nodes "$NNODES" \
       "${PLAN_ARGS[@]}" "${OVERRIDES[@]}") || fail "invalid configuration or checkpoint (see the message above); nothing was started"
eval "$PLAN"
N=$AMOE_NTASKS
log "model $AMOE_MODEL_NAME ($AMOE_MODEL_PATH): $N data-plane tasks = 1 gateway + $AMOE_ATTENTION_RANKS attention + $AMOE_EXPERT_RANKS expert ranks; device $AMOE_DEVICE"

# --------------------------------------------------------------------------- Ray
# Ray's ports listen on every interface and speak pickle: the job's cluster gets a random token
# (srun hands the environment to the workers) unless the site sets RAY_AUTH_MODE itself.
if [ -z "${RAY_AUTH_MODE:-}" ]; then
  export RAY_AUTH_MODE=token
  export RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$("$PY" -c 'import secrets; print(secrets.token_hex(32))')}
fi
export RAY_USAGE_STATS_ENABLED=0
# Serve restarts an HTTP proxy that misses 3 readiness checks of 5 s, which a head node busy
# starting the ranks can miss: give it longer (a site may set its own).
export RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S=${RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S:-30}
export RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S=${RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S:-30}
RAY_PORT=${AMOE_RAY_PORT:-$("$PY" -m amoe_serve.serving.attach free-port)}
RAY_TMP=${AMOE_RAY_TMPDIR:-/tmp/ray-amoe-$SLURM_JOB_ID}  # short: Ray's socket paths are length-limited
RAY_OPTS=(--block --num-cpus "$AMOE_RAY_CPUS" --num-gpus 0 --disable-usage-stats
          --object-store-memory "${AMOE_RAY_OBJECT_STORE_BYTES:-200000000}")
# The head alone advertises the custom resource amoe_head: the Serve ingress replicas ask for a
# sliver of it (serving/up.py, HEAD_RESOURCE), so they run here next to the HTTP proxy (Serve's
# proxy_location=HeadOnly) and the gateway, and a lost worker node cannot take the ingress with it.
start_ray_head() {
  start ray-head "$RAY" start --head --port "$RAY_PORT" --node-ip-address "$HEAD_ADDR" --include-dashboard=false \
    --resources '{"amoe_head": 1}' --temp-dir "$RAY_TMP" "${RAY_OPTS[@]}" >"$JOB_DIR/ray-head.log" 2>&1
}
start_ray_head
log "Ray head at $HEAD_ADDR:$RAY_PORT (pid ${PIDS[ray-head]}, log $JOB_DIR/ray-head.log)"

# --------------------------------------------------------------------------- Ray workers
WATCH=()  # node=address of every other node, for the supervisor
# Started now, joined once the head is up (a worker that comes first gives up after a minute),
# with the job's auth token (srun passes the environment on); the data plane starts meanwhile.
if [ "$NNODES" -gt 1 ]; then
  # The workers' raylet port is fixed so that the supervisor below can tell a lost node (it no
  # longer accepts connections there) long before Slurm does (SlurmdTimeout).
  RAY_NODE_PORT=${AMOE_RAY_NODE_PORT:-$("$PY" -m amoe_serve.serving.attach free-port)}
  for n in "${NODES[@]:1}"; do
    a=$(scontrol show node "$n" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
    WATCH+=("$n=${a:-$n}")
  done
  # One worker per other node, each with its own temp dir (node-local even where /tmp is shared),
  # removed when it stops; srun forwards SIGTERM to it.
  cat >"$JOB_DIR/ray-worker.sh" <<'EOF'
#!/usr/bin/env bash
# One Ray worker node: `ray start --block` with a node-local temp dir. Ray gives a new raylet 30 s
# to register and gives up otherwise (a node busy loading the ranks can miss that): then what it
# left of this task (processes carrying this task's Slurm ids) is killed and it is tried again.
tmp="$1-$(hostname -s)"; shift
stop=0 pid=
trap 'stop=1; [ -n "$pid" ] && kill -TERM $pid 2>/dev/null' TERM INT
mine() {
  grep -lszx "SLURM_STEP_ID=$SLURM_STEP_ID" $(grep -lszx "SLURM_JOB_ID=$SLURM_JOB_ID" /proc/[0-9]*/environ) \
    | xargs -r grep -lszx "SLURM_PROCID=$SLURM_PROCID" | sed 's|/proc/\([0-9]*\)/environ|\1|' | grep -vx "$$"
}
for attempt in 1 2 3; do
  "$@" --temp-dir "$tmp" </dev/null & pid=$!
  wait $pid; rc=$?
  kill -0 $pid 2>/dev/null && { wait $pid; rc=$?; }  # woken by the trap: wait for the exit
  [ "$stop" = 1 ] || [ "$rc" = 0 ] && break
  echo "ray-worker on $(hostname -s): ray start exited with code $rc (attempt $attempt of 3)" >&2
  for p in $(mine); do kill -KILL "$p" 2>/dev/null; done
  rm -rf "$tmp"
  [ "$attempt" -lt 3 ] && sleep 2
done
rm -rf "$tmp"
exit $rc
EOF
  start ray-workers bash -c 'until grep -q "Ray runtime started" "$0" 2>/dev/null; do sleep 0.5; done; exec "$@"' \
    "$JOB_DIR/ray-head.log" srun --overlap --nodes=$((NNODES - 1)) --ntasks=$((NNODES - 1)) --ntasks-per-node=1 \
    --exclude="$HEAD_NODE" --kill-on-bad-exit=1 bash "$JOB_DIR/ray-worker.sh" "$RAY_TMP" \
    "$RAY" start --address "$HEAD_ADDR:$RAY_PORT" --node-manager-port "$RAY_NODE_PORT" "${RAY_OPTS[@]}" \
    >"$JOB_DIR/ray-workers.log" 2>&1
  log "Ray workers on ${NODES[*]:1}: join once the head is up (pid ${PIDS[ray-workers]})"
fi

# --------------------------------------------------------------------------- MPI between nodes
MPI_NET=${AMOE_MPI_NET:-auto}
if [ "$NNODES" -gt 1 ] && [ "$MPI_NET" = auto ]; then
  ids=$(timeout 60 srun --overlap --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 \
        cat /proc/sys/kernel/random/boot_id 2>/dev/null | sort -u | wc -l)
  if [ "$ids" = 1 ]; then
    MPI_NET=tcp
    log "the $NNODES nodes share one kernel (one boot id): MPI between them over TCP"
  fi
fi
case $MPI_NET in
  tcp) export MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=${FI_PROVIDER:-tcp}
       log "MPI between nodes: MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=$FI_PROVIDER (MPICH's shared memory only within a node)" ;;
  ofi) export MPIR_CVAR_CH4_NETMOD=ofi
       log "MPI between nodes: MPIR_CVAR_CH4_NETMOD=ofi${FI_PROVIDER:+ FI_PROVIDER=$FI_PROVIDER}" ;;
  auto|default) ;;
  *) fail "AMOE_MPI_NET=$MPI_NET: expected auto, tcp, ofi or default" ;;
esac

# --------------------------------------------------------------------------- data plane
# Per-rank environment: one GPU per rank by node-local id (the gateway, rank 0, shares the
# first GPU of the head node with the next rank), or none on CPU-only configs.
cat >"$JOB_DIR/rank-env.sh" <<'EOF'
#!/usr/bin/env bash
lid=${SLURM_LOCALID:-0}
if [ "${AMOE_DEVICE:-auto}" = cpu ]; then
  export CUDA_VISIBLE_DEVICES=""
else
  IFS=',' read -r -a gpus <<< "${CUDA_VISIBLE_DEVICES-}"
  if [ "${#gpus[@]}" -eq 0 ]; then
    n=${AMOE_GPUS_PER_NODE:-0}
    if [ "$n" = 0 ] && command -v nvidia-smi >/dev/null 2>&1; then n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); fi
    gpus=(); for ((g = 0; g < n; g++)); do gpus+=("$g"); done
  elif [ "${AMOE_GPUS_PER_NODE:-0}" -gt 0 ]; then
    gpus=("${gpus[@]:0:$AMOE_GPUS_PER_NODE}")
  fi
  if [ "${#gpus[@]}" -gt 0 ]; then
    slot=$lid
    [ "${SLURM_NODEID:-0}" = 0 ] && [ "$lid" -gt 0 ] && slot=$((lid - 1))  # rank 0 is local id 0 on node 0
    export CUDA_VISIBLE_DEVICES=${gpus[$((slot % ${#gpus[@]}))]}
  fi
fi
export OMP_NUM_THREADS=${AMOE_THREADS:-1} MKL_NUM_THREADS=${AMOE_THREADS:-1}
[ "${SLURM_NODEID:-0}" = 0 ] && exec "$@"  # the batch script cleans the head node up
# Other nodes: run the rank, then remove the MPICH segments this job left in this node's /dev/shm
# that no process has open (a rank that is SIGKILLed leaves them behind).
"$@" & pid=$!
trap 'kill -TERM $pid 2>/dev/null' TERM INT
wait $pid; rc=$?
kill -0 $pid 2>/dev/null && { wait $pid; rc=$?; }  # woken by the trap: wait for the exit
if [ -n "${AMOE_SHM_MARK:-}" ] && [ -e "$AMOE_SHM_MARK" ]; then
  for f in /dev/shm/mpich_shm_*; do
    [ -O "$f" ] && [ "$f" -nt "$AMOE_SHM_MARK" ] || continue
    find /proc/[0-9]*/fd -lname "$f*" 2>/dev/null | grep -q . || rm -f "$f"
  done
fi
exit $rc
EOF
export AMOE_DEVICE AMOE_THREADS AMOE_GPUS_PER_NODE
SRUN=(srun --mpi=pmi2 --ntasks="$N" --nodes="$((N < NNODES ? N : NNODES))" --kill-on-bad-exit=1 --label)
ALLOCATED=${SLURM_NTASKS:-${SLURM_NPROCS:-0}}
if [ "$ALLOCATED" -lt "$N" ]; then
  log "the job has $ALLOCATED task(s) for $N data-plane ranks: starting them with --overcommit"
  SRUN+=(--overcommit)
fi
if [ -n "${AMOE_NODE_OF_RANK:-}" ]; then
  : >"$JOB_DIR/hostfile"
  for idx in $AMOE_NODE_OF_RANK; do echo "${NODES[$idx]}" >>"$JOB_DIR/hostfile"; done
  export SLURM_HOSTFILE=$JOB_DIR/hostfile
  SRUN+=(--distribution=arbitrary)
else
  SRUN+=(--distribution="$AMOE_DISTRIBUTION")
fi
# shellcheck disable=SC2206
SRUN+=(${AMOE_SRUN_ARGS:-})
GATEWAY_FILE=$JOB_DIR/gateway.address
rm -f "$GATEWAY_FILE"
SHM_MARK=$JOB_DIR/.shm-mark
touch "$SHM_MARK"; sleep 1  # files written from now on are newer (-nt) than the mark
export AMOE_SHM_MARK=$SHM_MARK
start data-plane "${SRUN[@]}" bash "$JOB_DIR/rank-env.sh" "$PY" -u -m amoe_serve.engine.rank_main \
  --config "$AMOE_JOB_CONFIG" --serve --address-file "$GATEWAY_FILE"
log "data plane: ${SRUN[*]} ... rank_main (srun pid ${PIDS[data-plane]})"

alive_or_fail() {  # every started component must still run
  local name
  for name in "${ORDER[@]}"; do
    local pid=${PIDS[$name]:-}
    [ -n "$pid" ] || continue
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" 2>/dev/null
      local rc=$?
      unset "PIDS[$name]"
      case $name in
        data-plane) fail "the data plane (srun step) exited with code $rc$1; see the rank messages above" ;;
        ray-head) fail "the Ray head exited with code $rc$1; see $JOB_DIR/ray-head.log: $(tail -n 3 "$JOB_DIR/ray-head.log" | tr '\n' ' ')" ;;
        ray-workers) fail "the Ray workers (srun step) exited with code $rc$1; see $JOB_DIR/ray-workers.log" ;;
        ingress) fail "the Serve ingress exited with code $rc$1; see its messages above" ;;
      esac
    fi
  done
}

# Ray gives a new raylet 30 s to register and gives up otherwise, which a node busy loading the
# ranks can miss: a head that exits while starting is cleared away (its processes have paths in
# its temp dir on their command lines) and started again, at most 3 times. The ranks start meanwhile.
head_tries=1
deadline=$((SECONDS + AMOE_READY_TIMEOUT))
until grep -q "Ray runtime started" "$JOB_DIR/ray-head.log" 2>/dev/null; do
  if ! kill -0 "${PIDS[ray-head]}" 2>/dev/null && [ "$head_tries" -lt 3 ]; then
    wait "${PIDS[ray-head]}"
    log "the Ray head exited while starting (attempt $head_tries of 3): $(grep -m 1 '^Exception' "$JOB_DIR/ray-head.log")"
    for p in $(grep -lsaF -- "$RAY_TMP/" /proc/[0-9]*/cmdline | sed 's|/proc/\([0-9]*\)/cmdline|\1|'); do
      grep -qzx "SLURM_JOB_ID=$SLURM_JOB_ID" "/proc/$p/environ" 2>/dev/null && kill -KILL "$p" 2>/dev/null
    done
    rm -rf "$RAY_TMP"
    head_tries=$((head_tries + 1))
    start_ray_head
  fi
  alive_or_fail " before the Ray head was up"
  [ "$SECONDS" -lt "$deadline" ] || fail "the Ray head did not start within ${AMOE_READY_TIMEOUT} s; see $JOB_DIR/ray-head.log"
  nap 0.5
done
log "Ray head up"

deadline=$((SECONDS + AMOE_READY_TIMEOUT))
while [ ! -s "$GATEWAY_FILE" ]; do
  alive_or_fail " before the gateway came up"
  [ "$SECONDS" -lt "$deadline" ] || fail "the data plane did not open its gateway within ${AMOE_READY_TIMEOUT} s (slurm.ready_timeout_s)"
  nap 0.5
done
GATEWAY=$(cat "$GATEWAY_FILE")
GW_HOST=${GATEWAY%:*}
GW_PORT=${GATEWAY##*:}
case $GW_HOST in 0.0.0.0|::|"") GW_HOST=$HEAD_ADDR ;; esac
log "gateway of model $AMOE_MODEL_NAME at $GW_HOST:$GW_PORT"

# The gateway (rank 0) runs on this node. When a rank on another node dies with its node, the
# gateway exits within seconds (MPI error or heartbeat), but srun waits for the lost node's tasks
# until Slurm declares the node down (SlurmdTimeout): watch the gateway's pid as well.
gateway_pid() {
  local f d argv0
  for f in $(grep -lsa 'amoe_serve.engine.rank_main' /proc/[0-9]*/cmdline); do
    d=${f%/cmdline}
    argv0=$(tr '\0' '\n' <"$f" 2>/dev/null | head -n 1)
    case ${argv0##*/} in srun|bash|sh) continue ;; esac
    tr '\0' '\n' <"$d/environ" 2>/dev/null | grep -qx "SLURM_JOB_ID=$SLURM_JOB_ID" || continue
    tr '\0' '\n' <"$d/environ" 2>/dev/null | grep -qx "SLURM_PROCID=0" || continue
    echo "${d#/proc/}"
    return
  done
}
GW_PID=$(gateway_pid)
[ -n "$GW_PID" ] && log "gateway pid $GW_PID"

# --------------------------------------------------------------------------- ingress
INGRESS_URL_FILE=$JOB_DIR/ingress.url
rm -f "$INGRESS_URL_FILE"
start ingress "${AMOE[@]}" ingress --config "$AMOE_JOB_CONFIG" --gateway "$AMOE_MODEL_NAME=$GW_HOST:$GW_PORT" \
  --token-file "$JOB_DIR/link.token" --ray-address "$HEAD_ADDR:$RAY_PORT" --address-file "$INGRESS_URL_FILE"
deadline=$((SECONDS + AMOE_READY_TIMEOUT))
while [ ! -s "$INGRESS_URL_FILE" ]; do
  alive_or_fail " before the endpoint was up"
  [ "$SECONDS" -lt "$deadline" ] || fail "the Serve ingress did not come up within ${AMOE_READY_TIMEOUT} s"
  nap 0.5
done
URL=$(cat "$INGRESS_URL_FILE")
if [ -n "${AMOE_ENDPOINT_HOST:-}" ]; then
  URL="http://$AMOE_ENDPOINT_HOST:$AMOE_SERVE_PORT${AMOE_ROUTE_PREFIX:-}/v1"
elif [ "$NNODES" -gt 1 ]; then
  # The head's address, as for Ray and the gateway: a client anywhere Slurm's nodes are reachable
  # needs no name resolution (the ingress listens on serving.host, 0.0.0.0 in configs/slurm/).
  case $AMOE_SERVE_HOST in
    0.0.0.0|::|"") EP_HOST=$HEAD_ADDR ;;
    *) EP_HOST=$AMOE_SERVE_HOST ;;
  esac
  [[ $EP_HOST == *:* ]] && EP_HOST="[$EP_HOST]"
  URL="http://$EP_HOST:$AMOE_SERVE_PORT${AMOE_ROUTE_PREFIX:-}/v1"
fi
echo "$URL" >"$ENDPOINT_FILE.tmp" && mv -f "$ENDPOINT_FILE.tmp" "$ENDPOINT_FILE"
{
  echo "$(printf '=%.0s' {1..72})"
  echo "AMOE_SERVE_ENDPOINT=$URL"
  echo "  model: $AMOE_MODEL_NAME    endpoint file: $ENDPOINT_FILE"
  echo "  try:   curl -s $URL/completions -H 'content-type: application/json' -d '{\"model\": \"$AMOE_MODEL_NAME\", \"prompt\": \"Hello\", \"max_tokens\": 16}'"
  echo "  stop:  scancel $SLURM_JOB_ID"
  echo "$(printf '=%.0s' {1..72})"
} 
printf 'pids: ray-head=%s data-plane=%s ingress=%s%s\n' "${PIDS[ray-head]}" "${PIDS[data-plane]}" "${PIDS[ingress]}" \
  "${PIDS[ray-workers]:+ ray-workers=${PIDS[ray-workers]}}" >"$JOB_DIR/pids"

# --------------------------------------------------------------------------- supervise
# A node that is lost (crashed, or cut off) leaves srun waiting for Slurm to declare it down, and
# MPI over TCP may block on the lost peer rather than fail: the job would hang for SlurmdTimeout.
# Each other node's raylet port is probed every second; once it has answered, two misses in a
# row (refused, or no answer within 1 s) count as a lost node: the gateway is killed at once
# (the ingress then fails in-flight requests and /health answers 503) and, after a short drain
# (AMOE_DOWN_DRAIN_S, 3 s: in-flight streams get their error event and health checks see the 503
# before the endpoint goes away), the job is torn down. AMOE_NODE_WATCH=0 turns the watch off.
declare -A SEEN=() MISSES=()
node_lost() {
  local w n a
  [ "${AMOE_NODE_WATCH:-1}" = 0 ] && return 1
  for w in "${WATCH[@]}"; do
    n=${w%%=*}; a=${w#*=}
    if timeout 1 bash -c "exec 3<>/dev/tcp/$a/$RAY_NODE_PORT" 2>/dev/null; then
      SEEN[$n]=1; MISSES[$n]=0
    elif [ -n "${SEEN[$n]:-}" ]; then
      MISSES[$n]=$((${MISSES[$n]:-0} + 1))
      if [ "${MISSES[$n]}" -ge 2 ]; then LOST=$n; return 0; fi
    fi
  done
  return 1
}
while true; do
  alive_or_fail "; tearing the job down"
  if [ -n "$GW_PID" ] && ! kill -0 "$GW_PID" 2>/dev/null; then
    fail "the gateway (rank 0, pid $GW_PID) exited: the data plane is down (a rank or its node failed; see the rank messages above); tearing the job down"
  fi
  if [ "${#WATCH[@]}" -gt 0 ] && node_lost; then
    [ -n "$GW_PID" ] && kill -KILL "$GW_PID" 2>/dev/null
    log "node $LOST is lost: stopped the gateway; the ingress fails in-flight requests, tearing down in ${AMOE_DOWN_DRAIN_S:-3} s"
    nap "${AMOE_DOWN_DRAIN_S:-3}"
    fail "node $LOST is lost (its Ray worker's port $RAY_NODE_PORT stopped answering): stopped the gateway, so in-flight requests fail; tearing the job down"
  fi
  nap 1
done
