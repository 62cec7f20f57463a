#!/usr/bin/env bash
# Streams one worker's training log (worker 0 by default), or copies every worker's log here.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<EOF2
Usage: $TPU_PROG [settings] [--run NAME] [--worker I] [--slice S] [--lines N]
       $TPU_PROG [settings] [--run NAME] --fetch DIR [--workers N]

Streams ~/$TPU_LOG_ROOT/NAME/worker-I.log of slice S (tail -F: it follows a restarted
run; Ctrl-C stops the stream, not the training). With --fetch, copies every worker's log of
every slice to DIR/<node>/worker-<i>.log (gcloud compute tpus tpu-vm scp, one per worker).

Options:
  --run NAME     the run launch.sh started; default latest (the last launch)
  --worker I     default 0 (the worker whose process 0 prints the progress)
  --slice S      default 0; for a multi-slice TPU
  --lines N      lines of history to show first; default 100
  --fetch DIR    copy all the logs instead of streaming one
  --workers N    workers per slice; default from --accelerator-type (v5p-32: 4)
$(tpu_settings_help)
EOF2
}

tpu_parse "$@"
run=latest worker=0 slice=0 lines=100 fetch="" workers=""
set -- "${TPU_REST[@]+"${TPU_REST[@]}"}"
while (($#)); do
  flag=$1
  if [[ $flag == --*=* ]]; then
    set -- "${flag%%=*}" "${flag#*=}" "${@:2}"
    flag=$1
  fi
  case $flag in
    --run | --worker | --slice | --lines | --fetch | --workers)
      (($# > 1)) || tpu_die "$flag needs a value"
      case $flag in
        --run) run=$2 ;;
        --worker) worker=$2 ;;
        --slice) slice=$2 ;;
        --lines) lines=$2 ;;
        --fetch) fetch=$2 ;;
        --workers) workers=$2 ;;
      esac
      shift 2
      ;;
    *) tpu_die "unknown option '$1' (see --help)" ;;
  esac
done
tpu_require_target
tpu_check_run_name "$run"
for pair in "worker:$worker" "slice:$slice" "lines:$lines"; do
  [[ ${pair#*:} =~ ^[0-9]+$ ]] || tpu_die "--${pair%%:*} must be a number, not '${pair#*:}'"
done
((slice < NUM_SLICES)) || tpu_die "--slice $slice: the TPU has $NUM_SLICES slice(s)"
mapfile -t nodes < <(tpu_node_names)

if [[ -z $fetch ]]; then
  tpu_run gcloud compute tpus tpu-vm ssh "${nodes[slice]}" "--project=$PROJECT" "--zone=$ZONE" \
    "--worker=$worker" "${TPU_SSH_FLAGS[@]+"${TPU_SSH_FLAGS[@]}"}" "--command=tail -n $lines -F \$HOME/$TPU_LOG_ROOT/$run/worker-$worker.log"
  exit 0
fi

if [[ -z $workers ]]; then
  tpu_require_accelerator
  workers=$(tpu_hosts_per_slice)
  ((workers > 0)) || tpu_die "workers per slice of '$ACCELERATOR_TYPE' unknown: pass --workers N"
fi
[[ $workers =~ ^[1-9][0-9]*$ ]] || tpu_die "--workers must be a positive number, not '$workers'"
for node in "${nodes[@]}"; do
  tpu_run mkdir -p "$fetch/$node"
  for ((i = 0; i < workers; i++)); do
    tpu_run gcloud compute tpus tpu-vm scp "$node:$TPU_LOG_ROOT/$run/worker-$i.log" \
      "$fetch/$node/worker-$i.log" "--project=$PROJECT" "--zone=$ZONE" "--worker=$i" \
      "${TPU_SSH_FLAGS[@]+"${TPU_SSH_FLAGS[@]}"}"
  done
done
