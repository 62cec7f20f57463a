#!/usr/bin/env bash
# Creates the TPU: a TPU VM, or a queued resource (one slice, or several for multi-slice).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<EOF
Usage: $TPU_PROG [settings] [--wait [--timeout SECONDS]] [-- EXTRA_GCLOUD_FLAGS...]

Creates the TPU named by the settings:
  (default)          a queued resource, Google's recommended way to get TPUs:
                     gcloud compute tpus queued-resources create --node-id NAME
  --num-slices N>1   gcloud compute tpus queued-resources create --node-count N
                     --node-prefix NAME: slices NAME-0 ... NAME-(N-1), joined over the
                     data-centre network (multi-slice always uses a queued resource)
  --tpu-vm           a plain TPU VM: gcloud compute tpus tpu-vm create (capacity now, or
                     an error); give --tpu-vm to the other scripts too
A queued resource waits for capacity; --wait polls until it is ACTIVE (or fails).
Flags after -- go to the gcloud create command as they are (e.g. --network=NET,
--labels=team=vision, --valid-until-duration=6h).

Options:
  --wait              poll a queued resource every 60 s until it is ACTIVE; FAILED or
                      SUSPENDED stops, and so do 5 failed describes in a row
  --timeout SECONDS   give up waiting after this long (the request stays queued);
                      default 86400
$(tpu_settings_help)
EOF
}

tpu_parse "$@"
wait_active=0
wait_timeout=86400
poll_s=${TPU_POLL_SECONDS:-60}  # the tests poll faster
extra=()
set -- "${TPU_REST[@]+"${TPU_REST[@]}"}"
while (($#)); do
  case $1 in
    --wait) wait_active=1 && shift ;;
    --timeout) (($# > 1)) || tpu_die "--timeout needs a value"; wait_timeout=$2 && shift 2 ;;
    --timeout=*) wait_timeout=${1#*=} && shift ;;
    --) extra=("${@:2}") && break ;;
    *) tpu_die "unknown option '$1' (see --help)" ;;
  esac
done
tpu_require_target
tpu_require_accelerator
[[ $wait_timeout =~ ^[0-9]+$ ]] || tpu_die "--timeout must be a number of seconds, not '$wait_timeout'"
[[ $poll_s =~ ^[0-9]+$ ]] || tpu_die "TPU_POLL_SECONDS must be a number of seconds, not '$poll_s'"
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
      tpu_note "repeated every $poll_s s until the state is ACTIVE, for at most $wait_timeout s (FAILED, SUSPENDED or 5 failed describes in a row: stop):"
      tpu_run "${describe[@]}"
    else
      deadline=$((SECONDS + wait_timeout)) failures=0 state=""
      while :; do
        if state=$(tpu_run "${describe[@]}"); then
          failures=0
          case $state in
            ACTIVE) break ;;
            FAILED | SUSPENDED | SUSPENDING) tpu_fail "queued resource $TPU_NAME is $state" ;;
          esac
          tpu_note "queued resource $TPU_NAME is ${state:-unknown}; checking again in $poll_s s"
        else
          failures=$((failures + 1))
          ((failures < 5)) || tpu_fail "describing queued resource $TPU_NAME failed 5 times in a row (gcloud's messages above)"
          tpu_note "describing queued resource $TPU_NAME failed ($failures of 5 in a row); checking again in $poll_s s"
        fi
        ((SECONDS + poll_s <= deadline)) ||
          tpu_fail "queued resource $TPU_NAME not ACTIVE after $wait_timeout s (last state: ${state:-unknown}); it stays queued (delete.sh cancels it)"
        sleep "$poll_s"
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
