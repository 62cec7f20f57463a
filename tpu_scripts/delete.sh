#!/usr/bin/env bash
# Deletes the TPU (a TPU VM, or a queued resource with its slices).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<EOF2
Usage: $TPU_PROG [settings] [--yes]

Deletes the TPU named by the settings: gcloud compute tpus tpu-vm delete, or, with --queued
or --num-slices N > 1, gcloud compute tpus queued-resources delete --force (its slices
first, then the request). Checkpoints and TensorBoard logs in the gs:// workdir stay; the
logs on the workers go with them (fetch them first: logs.sh --fetch DIR).

Options:
  --yes   do not ask for confirmation (gcloud --quiet)
$(tpu_settings_help)
EOF2
}

tpu_parse "$@"
quiet=()
set -- "${TPU_REST[@]+"${TPU_REST[@]}"}"
while (($#)); do
  case $1 in
    --yes) quiet=(--quiet) && shift ;;
    *) tpu_die "unknown option '$1' (see --help)" ;;
  esac
done
tpu_require_target

if ((QUEUED)); then
  tpu_run gcloud compute tpus queued-resources delete "$TPU_NAME" "--project=$PROJECT" \
    "--zone=$ZONE" --force "${quiet[@]+"${quiet[@]}"}"
else
  tpu_run gcloud compute tpus tpu-vm delete "$TPU_NAME" "--project=$PROJECT" "--zone=$ZONE" \
    "${quiet[@]+"${quiet[@]}"}"
fi
