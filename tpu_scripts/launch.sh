#!/usr/bin/env bash
# Starts the same `llava-jax train ...` on every worker of every slice, detached, one log per
# worker.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<EOF
Usage: $TPU_PROG [settings] [--run NAME] [--env KEY=VALUE]... -- TRAIN_ARGS...

Runs \`llava-jax train TRAIN_ARGS\` on every worker (--worker=all; --node=all for a queued
resource), in ~/llava-jax, detached (setsid nohup), appending to
  ~/$TPU_LOG_ROOT/NAME/worker-<i>.log   (i: the worker's index in its slice)
  ~/$TPU_LOG_ROOT/NAME/worker-<i>.pid   (what stop.sh signals)
and pointing ~/$TPU_LOG_ROOT/latest at NAME. A worker that is still running a launched
training refuses to start another.

TRAIN_ARGS must hold --config FILE[:ARG] and --workdir DIR. The config file (a path
relative to here) is copied to the same path under ~/llava-jax on every worker first, so
the workers run the config you have here. On more than one host the workdir must be a
gs:// path: every host writes its part of each checkpoint there. Launching the same
command again resumes from the workdir's latest checkpoint.

Multi-slice: nothing to add. The queued resource gives each slice's workers their
MEGASCALE_* settings (coordinator, slice id, number of slices) in the TPU metadata, where
jax.distributed.initialize() reads them.

Options:
  --run NAME        names the log directory; default the workdir's last path component
  --env KEY=VALUE   an environment variable for the training (repeatable), e.g.
                    --env LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true
$(tpu_settings_help)
EOF
}

tpu_parse "$@"
run=""
envs=()
train=()
set -- "${TPU_REST[@]+"${TPU_REST[@]}"}"
while (($#)); do
  case $1 in
    --run) (($# > 1)) || tpu_die "--run needs a value"; run=$2 && shift 2 ;;
    --run=*) run=${1#*=} && shift ;;
    --env) (($# > 1)) || tpu_die "--env needs KEY=VALUE"; envs+=("$2") && shift 2 ;;
    --env=*) envs+=("${1#*=}") && shift ;;
    --) train=("${@:2}") && break ;;
    *) tpu_die "unknown option '$1'; the training's arguments go after -- (see --help)" ;;
  esac
done
tpu_require_target

# The training arguments this script must understand: --config and --workdir.
config="" workdir=""
for ((i = 0; i < ${#train[@]}; i++)); do
  case ${train[i]} in
    --config | --workdir)
      ((i + 1 < ${#train[@]})) || tpu_die "${train[i]} needs a value"
      [[ ${train[i]} == --config ]] && config=${train[i + 1]} || workdir=${train[i + 1]}
      ;;
    --config=*) config=${train[i]#*=} ;;
    --workdir=*) workdir=${train[i]#*=} ;;
  esac
done
((${#train[@]})) || tpu_die "no training arguments: add -- --config FILE --workdir gs://BUCKET/RUN"
[[ -n $config ]] || tpu_die "the training arguments need --config FILE"
[[ -n $workdir ]] || tpu_die "the training arguments need --workdir DIR (gs://BUCKET/RUN on a pod)"

hosts=$(tpu_hosts_per_slice)
if [[ $workdir != gs://* ]] && ((hosts != 1 || NUM_SLICES > 1)); then
  tpu_die "--workdir must be a gs:// path on a multi-host TPU (every host writes the same checkpoint), not '$workdir'"
fi

config_file=${config%%:*}  # FILE[:ARG]
[[ $config_file != /* && $config_file != ../* && $config_file != *//* ]] ||
  tpu_die "--config '$config_file' must be a path relative to this directory, inside it"
[[ -f $config_file ]] || tpu_die "config file '$config_file' not found here (it is copied to every worker)"
[[ $config_file =~ ^[A-Za-z0-9_./-]+$ ]] || tpu_die "config path '$config_file' has characters outside [A-Za-z0-9_./-]"

if [[ -z $run ]]; then
  run=${workdir%/}
  run=${run##*/}
fi
tpu_check_run_name "$run"

env_words=()
for kv in "${envs[@]+"${envs[@]}"}"; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || tpu_die "--env takes KEY=VALUE, not '$kv'"
  env_words+=("$(tpu_quote "$kv")")
done
train_words=()
for word in "${train[@]}"; do
  train_words+=("$(tpu_quote "$word")")
done

logs="\$HOME/$TPU_LOG_ROOT"
dir="$logs/$run"
log="$dir/worker-\$W.log"
pid="$dir/worker-\$W.pid"
program="env ${env_words[*]+"${env_words[*]} "}\$HOME/$TPU_VENV_DIR/bin/llava-jax train ${train_words[*]}"
start=(
  "set -euo pipefail"
  "$(tpu_remote_worker_id)"
  "$(tpu_remote_alive)"
  "for p in $logs/*/worker-\$W.pid; do if alive \"\$p\"; then echo \"\$(hostname) worker \$W: busy with the training of \$p; stop it first (stop.sh)\" >&2; exit 1; fi; done"
  # No launched training runs here: anything else holding the TPU is a stray (a notebook, a
  # killed run's child), and a killed process leaves libtpu's lockfile behind; either makes
  # the training fail to open the TPU (MaxText's launchers clear both too). TPU chips are
  # /dev/accel* (v4, v5e, v5p) or /dev/vfio/* (v6e); the LLAVA_JAX_* overrides are the tests'.
  "S=; [ \"\$(id -u)\" = 0 ] || S='sudo -n'"
  "for p in \$(\$S lsof -t \${LLAVA_JAX_TPU_DEVICES:-/dev/accel* /dev/vfio/[0-9]*} 2>/dev/null | sort -u); do echo \"\$(hostname) worker \$W: killing pid \$p, a stray user of the TPU: \$(ps -o args= -p \$p)\"; \$S kill -9 \$p || true; done"
  "\$S rm -f \${LLAVA_JAX_LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}"
  "mkdir -p $dir"
  "ln -sfn $run $logs/latest"
  "cd \$HOME/llava-jax"
  # Grain's workers and the GCS connections open many files; the soft limit is often 1024.
  "ulimit -n \"\$(ulimit -Hn)\""
  "echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) launch on \$(hostname), worker \$W\" >> $log"
  "setsid nohup $program >> $log 2>&1 < /dev/null & echo \$! > $pid"
  "echo \"\$(hostname) worker \$W: pid \$!, log $log\""
)
remote=$(printf '%s; ' "${start[@]}")
remote=${remote%; }

config_dir=$(dirname "$config_file")
tpu_ssh_all "mkdir -p \$HOME/llava-jax/$config_dir"
tpu_scp_all "$config_file" "llava-jax/$config_file"
tpu_ssh_all "$remote"
tpu_note "logs: $(dirname "$0")/logs.sh --run $run (worker 0), --fetch DIR (all workers)"
