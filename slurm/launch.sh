#!/usr/bin/env bash
#SBATCH --job-name=amoe-serve
#SBATCH --nodes=1
#SBATCH --ntasks=4
#SBATCH --time=01:00:00
#SBATCH --signal=B:TERM@60
#SBATCH --output=amoe-serve-%j.out
#
# AMoE-serve on a Slurm allocation: Ray head on the first node (Ray workers on the others),
# the MPI data plane across the allocation with `srun --mpi=pmi2` (gateway rank 0 + A attention
# + E expert ranks), the Serve ingress on the head, and the endpoint URL in the job output and
# in a file. scancel, the time limit (SIGTERM 60 s before it, --signal above) or any component
# dying tears everything down.
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
# AMOE_RAY_PORT, AMOE_SRUN_ARGS (extra options of the data-plane srun, e.g. --gpus-per-task=1).
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
  ORDER+=("$name")
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
if [ "$NNODES" -eq 1 ]; then
  HEAD_ADDR=${AMOE_HEAD_ADDR:-127.0.0.1}
else
  HEAD_ADDR=${AMOE_HEAD_ADDR:-$(hostname -I 2>/dev/null | awk '{print $1}')}
  HEAD_ADDR=${HEAD_ADDR:-$(hostname -f)}
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
RAY_PORT=${AMOE_RAY_PORT:-$("$PY" -m amoe_serve.serving.attach free-port)}
RAY_TMP=${AMOE_RAY_TMPDIR:-/tmp/ray-amoe-$SLURM_JOB_ID}  # short: Ray's socket paths are length-limited
RAY_OPTS=(--block --num-cpus "$AMOE_RAY_CPUS" --num-gpus 0 --disable-usage-stats
          --object-store-memory "${AMOE_RAY_OBJECT_STORE_BYTES:-200000000}")
start ray-head "$RAY" start --head --port "$RAY_PORT" --node-ip-address "$HEAD_ADDR" --include-dashboard=false \
  --temp-dir "$RAY_TMP" "${RAY_OPTS[@]}" >"$JOB_DIR/ray-head.log" 2>&1
log "Ray head at $HEAD_ADDR:$RAY_PORT (pid ${PIDS[ray-head]}, log $JOB_DIR/ray-head.log)"
if [ "$NNODES" -gt 1 ]; then
  start ray-workers srun --overlap --nodes=$((NNODES - 1)) --ntasks=$((NNODES - 1)) --ntasks-per-node=1 \
    --exclude="$HEAD_NODE" --kill-on-bad-exit=1 "$RAY" start --address "$HEAD_ADDR:$RAY_PORT" "${RAY_OPTS[@]}" \
    >"$JOB_DIR/ray-workers.log" 2>&1
  log "Ray workers on ${NODES[*]:1} (srun pid ${PIDS[ray-workers]})"
fi

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
exec "$@"
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
  URL="http://$AMOE_ENDPOINT_HOST:$AMOE_SERVE_PORT/v1"
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
while true; do
  alive_or_fail "; tearing the job down"
  nap 2
done
