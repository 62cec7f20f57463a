#!/usr/bin/env bash
# Creates the TPU: a TPU VM, or a queued resource (one slice, or several for multi-slice).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<EOF
Usage: $TPU_PROG [settings] [--wait] [-- EXTRA_GCLOUD_FLAGS...]

Creates the TPU named by the settings:
  a TPU VM           gcloud compute tpus tpu-vm create (capacity now, or an error)
  --queued           gcloud compute tpus queued-resources create --node-id NAME
  --num-slices N>1   gcloud compute tpus queued-resources create --node-count N
                     --node-prefix NAME: slices NAME-0 ... NAME-(N-1), joined over the
                     data-centre network (multi-slice always uses a queued resource)
A queued resource waits for capacity; --wait polls until it is ACTIVE (or fails).
Flags after -- go to the gcloud create command as they are (e.g. --network=NET,
--labels=team=vision, --valid-until-duration=6h).

Options:
  --wait        poll a queued resource every 60 s until it is ACTIVE
$(tpu_settings_help)
EOF
}

tpu_parse "$@"
wait_active=0
extra=()
set -- "${TPU_REST[@]+"${TPU_REST[@]}"}"
while (($#)); do
  case $1 in
    --wait) wait_active=1 && shift ;;
    --) extra=("${@:2}") && break ;;
    *) tpu_die "unknown option '$1' (see --help)" ;;
  esac
done
tpu_require_target
tpu_require_accelerator
runtime=$(tpu_runtime_version) || exit 2

capacity=()
((SPOT)) && capacity+=(--spot)
((RESERVED)) && capacity+=(--reserved)

if ((QUEUED)); then
  if ((NUM_SLICES > 1)); then
    nodes=("--node-count=$NUM_SLICES" "--node-prefix=$TPU_NAME")
  else
    nodes=("--node-id=$TPU_NAME")
  fi
  tpu_run gcloud compute tpus queued-resources create "$TPU_NAME" "--project=$PROJECT" \
    "--zone=$ZONE" "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$runtime" \
    "${nodes[@]}" "${capacity[@]+"${capacity[@]}"}" "${extra[@]+"${extra[@]}"}"
  describe=(gcloud compute tpus queued-resources describe "$TPU_NAME" "--project=$PROJECT"
    "--zone=$ZONE" "--format=value(state.state)")
  if ((wait_active)); then
    if ((DRY_RUN)); then
      tpu_note "repeated every 60 s until the state is ACTIVE (FAILED or SUSPENDED: stop):"
      tpu_run "${describe[@]}"
    else
      while :; do
        state=$(tpu_run "${describe[@]}")
        case $state in
          ACTIVE) break ;;
          FAILED | SUSPENDED | SUSPENDING) tpu_fail "queued resource $TPU_NAME is $state" ;;
        esac
        tpu_note "queued resource $TPU_NAME is ${state:-unknown}; checking again in 60 s"
        sleep 60
      done
      tpu_note "queued resource $TPU_NAME is ACTIVE"
    fi
  else
    tpu_note "a queued resource waits for capacity; its state: $(tpu_join "${describe[@]}")"
  fi
else
  tpu_run gcloud compute tpus tpu-vm create "$TPU_NAME" "--project=$PROJECT" "--zone=$ZONE" \
    "--accelerator-type=$ACCELERATOR_TYPE" "--version=$runtime" \
    "${capacity[@]+"${capacity[@]}"}" "${extra[@]+"${extra[@]}"}"
fi
