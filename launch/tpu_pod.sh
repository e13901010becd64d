#!/usr/bin/env bash
# Cloud TPU VM / pod slice: create it, install this project on every worker, run one command
# on all workers at once, delete it.
#
#   export TPU_NAME=kf-v5e16 ZONE=us-west4-a ACCELERATOR=v5litepod-16 \
#          RUNTIME_VERSION=v2-alpha-tpuv5-lite [PROJECT=my-project] [SPOT=1]
#   launch/tpu_pod.sh create
#   launch/tpu_pod.sh install            # ships `git archive HEAD`, builds .venv on every worker
#   BUCKET=gs://my-bucket launch/tpu_pod.sh mount   # gcsfuse at /mnt/gcs on every worker
#   launch/tpu_pod.sh run python -m kforcing_jax.main.train --config=configs/lm1b_ar.py \
#       --workdir=/mnt/gcs/runs/lm1b --config.data.data_dir=/mnt/gcs/tensorflow_datasets
#   launch/tpu_pod.sh start python -m ...  # the same, detached (nohup); output in run.log
#   launch/tpu_pod.sh logs 0             # follow worker 0's run.log
#   launch/tpu_pod.sh ssh 0              # a shell on worker 0
#   launch/tpu_pod.sh delete
#
# `run` executes the SAME command on --worker=all: every host is one JAX process, and
# KFORCING_DISTRIBUTED=1 makes each main call jax.distributed.initialize(), which discovers
# the slice from the TPU metadata server. Data and workdir must be on GCS so all hosts see
# the same files: `mount` puts the bucket at /mnt/gcs on every worker. DRY_RUN=1 prints the
# gcloud commands instead of running them.
set -euo pipefail

REMOTE_DIR=${REMOTE_DIR:-kforcing_jax}
ACCELERATOR=${ACCELERATOR:-v5litepod-16}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
MOUNT_POINT=${MOUNT_POINT:-/mnt/gcs}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

# Print (DRY_RUN=1) or run a command, shell-quoted so what is printed is what would run.
do_cmd() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

need_target() {
  [[ -n "${TPU_NAME:-}" ]] || die "set TPU_NAME (the TPU VM / pod slice name)."
  [[ -n "${ZONE:-}" ]] || die "set ZONE (e.g. us-west4-a for v5e, us-central2-b for v4)."
}

gcloud_tpu() {
  do_cmd gcloud compute tpus tpu-vm "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}
}

# One remote shell command on every worker; tpu-vm ssh runs them in parallel.
on_all_workers() {
  gcloud_tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

cmd_create() {
  need_target
  local extra=()
  [[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
  gcloud_tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" \
    --version="$RUNTIME_VERSION" "${extra[@]}"
}

cmd_install() {
  need_target
  local archive=/tmp/kforcing_jax-src.tar.gz
  # the committed tree only: what runs on the pod is exactly a commit of this repo
  do_cmd git -C "$ROOT" archive --format=tar.gz -o "$archive" HEAD
  gcloud_tpu scp "$archive" "$TPU_NAME:kforcing_jax-src.tar.gz" --worker=all
  # TPU VM images ship an older Python; uv provides the 3.11 that the pins need.
  on_all_workers "set -e; mkdir -p $REMOTE_DIR && tar xzf kforcing_jax-src.tar.gz -C $REMOTE_DIR \
&& cd $REMOTE_DIR && python3 -m pip install -q --user uv \
&& ~/.local/bin/uv venv -q --python 3.11 .venv \
&& ~/.local/bin/uv pip install -q --python .venv/bin/python -r requirements.txt -r requirements-tpu.txt \
&& .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_devices())'"
}

# The remote form of a user command: repo dir, the venv's python, distributed start-up on.
remote_command() {
  [[ $# -gt 0 ]] || die "needs a command, e.g. run python -m kforcing_jax.main.train --config=..."
  local argv=("$@")
  [[ "${argv[0]}" == python || "${argv[0]}" == python3 ]] && argv[0]=.venv/bin/python
  printf 'cd %s && KFORCING_DISTRIBUTED=1 ' "$REMOTE_DIR"
  printf '%q ' "${argv[@]}"
}

cmd_run() {
  need_target
  local remote
  remote=$(remote_command "$@")
  on_all_workers "$remote"
}

# Like run, but survives a dropped ssh session: nohup, output in REMOTE_DIR/run.log per worker.
cmd_start() {
  need_target
  local remote
  remote=$(remote_command "$@")
  on_all_workers "nohup bash -c $(printf '%q' "$remote") < /dev/null > $REMOTE_DIR/run.log 2>&1 &"
}

# gcsfuse-mount the bucket at the same path on every worker: TFDS array_record files (read
# through grain) and the run directories (metrics.jsonl, eval.json, reports) are plain files,
# so all hosts share them through the mount; orbax writes checkpoints through it as well.
cmd_mount() {
  need_target
  [[ -n "${BUCKET:-}" ]] || die "set BUCKET (gs://name or name) to mount at $MOUNT_POINT."
  local bucket=${BUCKET#gs://}
  on_all_workers "set -e; if ! command -v gcsfuse >/dev/null; then \
echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" \
| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null \
&& curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - \
&& sudo apt-get -q update && sudo apt-get -q install -y gcsfuse; fi; \
sudo mkdir -p $MOUNT_POINT && sudo chown \$USER $MOUNT_POINT \
&& (mountpoint -q $MOUNT_POINT || gcsfuse --implicit-dirs $bucket $MOUNT_POINT)"
}

cmd_logs() {
  need_target
  gcloud_tpu ssh "$TPU_NAME" --worker="${1:-0}" --command="tail -n 50 -f $REMOTE_DIR/run.log"
}

cmd_ssh() {
  need_target
  gcloud_tpu ssh "$TPU_NAME" --worker="${1:-0}"
}

cmd_delete() {
  need_target
  gcloud_tpu delete "$TPU_NAME" --quiet
}

case "${1:-}" in
  create) shift; cmd_create "$@" ;;
  install) shift; cmd_install "$@" ;;
  run) shift; cmd_run "$@" ;;
  start) shift; cmd_start "$@" ;;
  logs) shift; cmd_logs "$@" ;;
  mount) shift; cmd_mount "$@" ;;
  ssh) shift; cmd_ssh "$@" ;;
  delete) shift; cmd_delete "$@" ;;
  *) die "usage: $0 create|install|mount|run CMD...|start CMD...|logs [WORKER]|ssh [WORKER]|delete (settings in env: TPU_NAME, \
ZONE, ACCELERATOR, RUNTIME_VERSION, PROJECT, SPOT, BUCKET, MOUNT_POINT, DRY_RUN)" ;;
esac
