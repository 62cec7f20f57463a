#!/usr/bin/env bash
# Stops a launched training on every worker: SIGTERM, so it saves a checkpoint and exits.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<EOF2
Usage: $TPU_PROG [settings] [--run NAME] [--wait SECONDS] [--kill]

Sends SIGTERM to the training launch.sh started on every worker (the pid in
~/$TPU_LOG_ROOT/NAME/worker-<i>.pid). llava-jax train answers SIGTERM as it answers a
preemption: all hosts agree on a step, save a checkpoint there and exit; launching the same
command again resumes from it. The TPU itself keeps running (and billing): delete.sh.

Options:
  --run NAME       default latest (the last launch)
  --wait SECONDS   wait this long on each worker for the process to exit; default 600,
                   0 = do not wait. A worker still running after it fails the command.
  --kill           SIGKILL to the training's whole process group instead: no checkpoint;
                   the next start resumes from the last one
$(tpu_settings_help)
EOF2
}

tpu_parse "$@"
run=latest wait_s=600 signal=TERM
set -- "${TPU_REST[@]+"${TPU_REST[@]}"}"
while (($#)); do
  case $1 in
    --run) (($# > 1)) || tpu_die "--run needs a value"; run=$2 && shift 2 ;;
    --run=*) run=${1#*=} && shift ;;
    --wait) (($# > 1)) || tpu_die "--wait needs a value"; wait_s=$2 && shift 2 ;;
    --wait=*) wait_s=${1#*=} && shift ;;
    --kill) signal=KILL && shift ;;
    *) tpu_die "unknown option '$1' (see --help)" ;;
  esac
done
tpu_require_target
tpu_check_run_name "$run"
# SIGTERM to the training alone: it saves, then ends its data workers itself. SIGKILL to its
# whole process group (launch.sh starts it with setsid: its pid is the group id), so no data
# worker or compiler child outlives it holding the TPU.
if [[ $signal == KILL ]]; then
  kill="kill -KILL -- -\$p"
else
  kill="kill -TERM \$p"
fi
[[ $wait_s =~ ^[0-9]+$ ]] || tpu_die "--wait must be a number of seconds, not '$wait_s'"

pid="\$HOME/$TPU_LOG_ROOT/$run/worker-\$W.pid"
who="\$(hostname) worker \$W"
stop=(
  "set -euo pipefail"
  "$(tpu_remote_worker_id)"
  "$(tpu_remote_alive)"
  "if ! alive $pid; then echo \"$who: no training of run $run running\"; exit 0; fi"
  "p=\$(cat $pid)"
  "$kill"
  "echo \"$who: sent SIG$signal to \$p\""
)
if ((wait_s > 0)); then
  stop+=(
    "for _ in \$(seq $wait_s); do alive $pid || break; sleep 1; done"
    "if alive $pid; then echo \"$who: \$p still running after $wait_s s\" >&2; exit 1; fi"
    "echo \"$who: stopped\""
  )
fi
remote=$(printf '%s; ' "${stop[@]}")
tpu_ssh_all "${remote%; }"
