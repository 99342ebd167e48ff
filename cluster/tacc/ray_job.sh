#!/usr/bin/env bash
# One SLURM job = one Ray cluster + one MLflow server + one study run.
#
#   sbatch cluster/tacc/<preset>.sbatch sweeps/multi_seed.py --profile tacc [more args]
#   sbatch -p <partition> -N <nodes> -A <allocation> -t <time> cluster/tacc/ray_job.sh sweeps/multi_seed.py --profile tacc
#
# Submit from the repo root (the job runs there: $SLURM_SUBMIT_DIR). Inside the
# allocation:
#   1. PostgreSQL + MLflow server on the first node (python -m cluster.services),
#      their data on $SCRATCH, so studies accumulate in one store across jobs;
#   2. a Ray head on the first node and a Ray worker on every other node (srun);
#   3. the study script against that cluster (RAY_ADDRESS, MLFLOW_TRACKING_URI,
#      ALIGNSWEEP_STORAGE exported; `--address auto` appended for .py scripts);
#   4. on exit, or on SIGTERM a few minutes before the time limit (--signal), the
#      study is interrupted (Ray Tune saves its state), MLflow and PostgreSQL stop
#      cleanly. Resubmit the same command to resume.
#
# Settings (environment; defaults in brackets):
#   ALIGNSWEEP_ROOT     [$SCRATCH/alignsweep]  ray_results/, mlflow/ (PostgreSQL + artifacts), hf/
#   ALIGNSWEEP_VENV     [$SLURM_SUBMIT_DIR/.venv]  the project's virtualenv (bin/setup makes it)
#   ALIGNSWEEP_MODULES  []  modules to `module load` first, e.g. "gcc cuda"
#   ALIGNSWEEP_GPUS_PER_NODE  [Ray's detection]
#   ALIGNSWEEP_HEAD_IP  [the first node's address]
#   ALIGNSWEEP_NODE_TIMEOUT  [600]  seconds to wait for all Ray nodes
#SBATCH -J alignsweep
#SBATCH -N 1
#SBATCH --ntasks-per-node=1
#SBATCH -t 02:00:00
#SBATCH -o alignsweep-%j.out
#SBATCH --signal=B:TERM@300
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: sbatch cluster/tacc/<preset>.sbatch sweeps/multi_seed.py --profile tacc [args]" >&2; exit 2; }
: "${SLURM_JOB_ID:?run this inside a SLURM job (sbatch)}"
repo="${ALIGNSWEEP_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$repo"
[ -f cluster/tacc/ray_job.sh ] || { echo "submit from the alignsweep repo root (job dir: $repo)" >&2; exit 2; }

if [ -n "${ALIGNSWEEP_MODULES:-}" ]; then
  # shellcheck disable=SC2086
  module load $ALIGNSWEEP_MODULES
fi
venv="${ALIGNSWEEP_VENV:-$repo/.venv}"
[ -x "$venv/bin/python" ] || { echo "no virtualenv at $venv: run bin/setup (on a login node) or set ALIGNSWEEP_VENV" >&2; exit 2; }
export PATH="$venv/bin:$PATH"

root="${ALIGNSWEEP_ROOT:-${SCRATCH:?neither ALIGNSWEEP_ROOT nor SCRATCH is set}/alignsweep}"
export ALIGNSWEEP_STORAGE="${ALIGNSWEEP_STORAGE:-$root/ray_results}"
export ALIGNSWEEP_STORE="${ALIGNSWEEP_STORE:-$root/mlflow}"
export HF_HOME="${HF_HOME:-$root/hf}"
# converted models, tokenized datasets, reference log-probs (trainables/reference.py): shared by all nodes
export ALIGNSWEEP_CACHE="${ALIGNSWEEP_CACHE:-$root/cache}"
mkdir -p "$ALIGNSWEEP_STORAGE" "$ALIGNSWEEP_STORE" "$HF_HOME" "$ALIGNSWEEP_CACHE"

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head="${nodes[0]}"
head_ip="${ALIGNSWEEP_HEAD_IP:-$(getent hosts "$head" | awk '{print $1; exit}')}"
head_ip="${head_ip:-$(hostname -I | awk '{print $1}')}"
# Ports from the job id, so two jobs sharing a node do not collide; kept below the
# kernel's ephemeral range (32768+) and above Ray's worker ports (10002-19999).
base=$((20000 + SLURM_JOB_ID % 1270 * 10))
ray_port=$base mlflow_port=$((base + 1)) pg_port=$((base + 2))
dash_agent_port=$((base + 3))
# Ray token authentication: other users share the cluster network. The token lives
# in ~/.ray/auth_token, on the $HOME every node mounts; `--generate` makes it once.
export RAY_AUTH_MODE=token
ray get-auth-token --generate >/dev/null   # prints the token: keep it out of the job log
export RAY_ADDRESS="$head_ip:$ray_port"
export MLFLOW_TRACKING_URI="http://$head_ip:$mlflow_port"
cpus="${SLURM_CPUS_ON_NODE:-$(nproc)}"
gpu_flag=()
[ -n "${ALIGNSWEEP_GPUS_PER_NODE:-}" ] && gpu_flag=(--num-gpus="$ALIGNSWEEP_GPUS_PER_NODE")

echo "alignsweep job $SLURM_JOB_ID: ${#nodes[@]} node(s), head $head ($head_ip)"
echo "  RAY_ADDRESS=$RAY_ADDRESS MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI"
echo "  ALIGNSWEEP_STORAGE=$ALIGNSWEEP_STORAGE ALIGNSWEEP_STORE=$ALIGNSWEEP_STORE HF_HOME=$HF_HOME"
echo "  ALIGNSWEEP_CACHE=$ALIGNSWEEP_CACHE"

study_pid="" step_pids=()
cleanup() {
  trap - EXIT TERM INT
  [ -n "$study_pid" ] && kill -INT "$study_pid" 2>/dev/null && wait "$study_pid" 2>/dev/null || true
  python -m cluster.services stop --root "$ALIGNSWEEP_STORE" || true
  # Ending the srun steps stops Ray on every node; SLURM reaps whatever is left.
  [ ${#step_pids[@]} -gt 0 ] && kill "${step_pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
# SLURM sends TERM (--signal=B:TERM@300) before the time limit: interrupt the study so
# Ray Tune saves its state, then stop the services cleanly.
trap 'echo "SIGTERM: stopping the study"; [ -n "$study_pid" ] && kill -INT "$study_pid" 2>/dev/null' TERM

python -m cluster.services start --root "$ALIGNSWEEP_STORE" --host 0.0.0.0 --port "$mlflow_port" \
  --pg-port "$pg_port" --advertise "$head_ip"

common=(--block --disable-usage-stats --num-cpus="$cpus" "${gpu_flag[@]}")
srun --nodes=1 --ntasks=1 --cpus-per-task="$cpus" --overlap -w "$head" \
  ray start --head --node-ip-address="$head_ip" --port="$ray_port" --include-dashboard=false \
  --dashboard-agent-listen-port="$dash_agent_port" \
  "${common[@]}" &
step_pids+=($!)
sleep 5
for node in "${nodes[@]:1}"; do
  srun --nodes=1 --ntasks=1 --cpus-per-task="$cpus" --overlap -w "$node" \
    ray start --address="$RAY_ADDRESS" --dashboard-agent-listen-port="$dash_agent_port" "${common[@]}" &
  step_pids+=($!)
done

# Wait until every node has joined; give up early if the head's step died.
alive_nodes() {
  timeout 60 python - <<'PY' 2>/dev/null || echo 0
import os, ray
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
print(sum(n["Alive"] for n in ray.nodes()))
PY
}
deadline=$((SECONDS + ${ALIGNSWEEP_NODE_TIMEOUT:-600}))
while :; do
  alive="$(alive_nodes | tail -n 1)"
  [ "${alive:-0}" -ge "${#nodes[@]}" ] && break
  kill -0 "${step_pids[0]}" 2>/dev/null || { echo "the Ray head failed to start (its output is above)" >&2; exit 1; }
  [ "$SECONDS" -lt "$deadline" ] || { echo "only ${alive:-0} of ${#nodes[@]} Ray nodes joined in time" >&2; exit 1; }
  sleep 5
done
echo "ray cluster up: $alive node(s)"

cmd=("$@")
if [[ "${cmd[0]}" == *.py ]]; then
  cmd=(python -u "${cmd[@]}")
  [[ " $* " == *" --address"* ]] || cmd+=(--address auto)
fi
echo "running: ${cmd[*]}"
"${cmd[@]}" </dev/null &
study_pid=$!
rc=0
wait "$study_pid" || rc=$?
if kill -0 "$study_pid" 2>/dev/null; then  # `wait` was cut short by the TERM trap
  wait "$study_pid" || rc=$?
fi
study_pid=""
echo "study exited with $rc"
exit "$rc"
