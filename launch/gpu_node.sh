#!/usr/bin/env bash
# Multi-GPU node(s): install this project with CUDA JAX, then run a command.
#
#   launch/gpu_node.sh install                      # .venv with requirements-gpu.txt
#   launch/gpu_node.sh run python -m kforcing_jax.main.train --config=configs/owt_ar.py \
#       --workdir=/shared/runs/owt --config.data.data_dir=/shared/tensorflow_datasets
#
# One node: one process drives all its GPUs (config.mesh_shape spreads them). Several nodes:
# run the same command on every node with
#   NUM_NODES=2 NODE_RANK=<0|1> COORDINATOR=<node0 host>:12355 launch/gpu_node.sh run ...
# which appends --coordinator_address/--num_processes/--process_id, so every main calls
# jax.distributed.initialize() with them. Workdir and data must be on a filesystem all nodes
# share (NFS, or gs:// with gcsfs-capable TFDS/orbax). DRY_RUN=1 prints instead of running.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-python3.11}

die() { echo "gpu_node.sh: $*" >&2; exit 2; }

do_cmd() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

cmd_install() {
  cd "$ROOT"
  do_cmd "$PYTHON" -m venv .venv
  do_cmd .venv/bin/pip install -q -r requirements.txt -r requirements-gpu.txt
  do_cmd .venv/bin/python -c 'import jax; print(jax.devices())'
}

cmd_run() {
  [[ $# -gt 0 ]] || die "run needs a command, e.g. run python -m kforcing_jax.main.train --config=..."
  cd "$ROOT"
  local argv=("$@")
  [[ "${argv[0]}" == python || "${argv[0]}" == python3 ]] && argv[0]=.venv/bin/python
  local nodes=${NUM_NODES:-1}
  if (( nodes > 1 )); then
    [[ -n "${NODE_RANK:-}" ]] || die "NUM_NODES=$nodes needs NODE_RANK (0..$((nodes - 1)))."
    [[ -n "${COORDINATOR:-}" ]] || die "NUM_NODES=$nodes needs COORDINATOR=host:port of node 0."
    argv+=(--coordinator_address="$COORDINATOR" --num_processes="$nodes"
           --process_id="$NODE_RANK")
  fi
  do_cmd "${argv[@]}"
}

case "${1:-}" in
  install) shift; cmd_install "$@" ;;
  run) shift; cmd_run "$@" ;;
  *) die "usage: $0 install|run CMD... (env: NUM_NODES, NODE_RANK, COORDINATOR, PYTHON, DRY_RUN)" ;;
esac
