# shellcheck shell=bash
# Settings and helpers shared by the tpu_scripts/*.sh commands; sourced, never run.
#
# Every setting comes from a flag or, failing that, an environment variable of the same
# meaning, so a shell can `export` them once and run create, setup, launch, logs, stop and
# delete with the same values. Nothing here calls gcloud: the commands build argv arrays and
# hand them to `tpu_run`, which prints each one and, without --dry-run, runs it.

# Where each worker keeps the virtual environment and the logs, relative to $HOME (used by
# the scripts that source this file).
# shellcheck disable=SC2034
readonly TPU_VENV_DIR="llava-jax-venv"
# shellcheck disable=SC2034
readonly TPU_LOG_ROOT="llava-jax-logs"
# The TPU metadata server's worker index (0-based within a slice); jax reads the same key.
readonly TPU_WORKER_ID_URL="http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"

TPU_PROG=$(basename "$0")

tpu_die() {  # one line on stderr, exit 2 (a setting or flag the user can fix)
  printf '%s: error: %s\n' "$TPU_PROG" "$1" >&2
  exit 2
}

tpu_fail() {  # one line on stderr, exit 1 (something outside the user's flags went wrong)
  printf '%s: error: %s\n' "$TPU_PROG" "$1" >&2
  exit 1
}

tpu_settings_help() {
  cat <<'EOF'
Settings (a flag, or the environment variable named after it):
  --project ID            PROJECT           Google Cloud project (required)
  --zone ZONE             ZONE              e.g. us-east5-a (required)
  --name NAME             TPU_NAME          the TPU VM, or the queued resource (required)
  --accelerator-type T    ACCELERATOR_TYPE  v5p-32, v5e-16 (= v5litepod-16), v6e-8, v4-32
  --runtime-version V     RUNTIME_VERSION   default by generation: v5p v2-alpha-tpuv5,
                                            v5e v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e,
                                            v4 tpu-ubuntu2204-base
  --num-slices N          NUM_SLICES        default 1; N > 1 is a multi-slice queued resource
  --tpu-vm                QUEUED=0          a plain TPU VM instead of a queued resource (the
                                            default, Google's recommended way; --queued)
  --ssh-flag FLAG         SSH_FLAGS         a gcloud ssh/scp flag for every worker command,
                                            repeatable: --ssh-flag=--internal-ip, or
                                            --ssh-flag=--tunnel-through-iap (queued
                                            resources only: tpu-vm ssh has no such flag)
  --spot                  SPOT=1            Spot capacity (preemptible)
  --reserved              RESERVED=1        capacity from a reservation
  --dry-run                                 print the commands, run nothing
  -h, --help                                this help
The same settings must be given to every script that addresses the same TPU.
EOF
}

tpu_bool() {  # NAME VALUE -> prints 1 or 0, or dies on anything else
  case ${2,,} in
    1 | true | yes | on) echo 1 ;;
    0 | false | no | off | "") echo 0 ;;
    *) tpu_die "$1 must be 1/true/yes or 0/false/no, not '$2'" ;;
  esac
}

# Parses the shared settings out of "$@"; everything else (and everything from `--` on) is
# left, in order, in the array TPU_REST for the script's own flags. `usage` must be defined.
tpu_parse() {
  PROJECT=${PROJECT:-}
  ZONE=${ZONE:-}
  TPU_NAME=${TPU_NAME:-}
  ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
  RUNTIME_VERSION=${RUNTIME_VERSION:-}
  NUM_SLICES=${NUM_SLICES:-1}
  QUEUED=$(tpu_bool QUEUED "${QUEUED:-1}") || exit 2
  SPOT=$(tpu_bool SPOT "${SPOT:-}") || exit 2
  RESERVED=$(tpu_bool RESERVED "${RESERVED:-}") || exit 2
  DRY_RUN=0
  local explicit_tpu_vm=0
  # shellcheck disable=SC2206  # SSH_FLAGS is a space-separated list of flags
  TPU_SSH_FLAGS=(${SSH_FLAGS:-})
  TPU_REST=()
  while (($#)); do
    local flag=$1 value=""
    if [[ $flag == --*=* ]]; then
      value=${flag#*=}
      flag=${flag%%=*}
    elif (($# > 1)); then
      value=$2
    fi
    case $flag in
      --project | --zone | --name | --accelerator-type | --runtime-version | --num-slices | --ssh-flag)
        if [[ $1 == --*=* ]]; then
          shift
        else
          (($# > 1)) || tpu_die "$flag needs a value"
          shift 2
        fi
        case $flag in
          --project) PROJECT=$value ;;
          --zone) ZONE=$value ;;
          --name) TPU_NAME=$value ;;
          --accelerator-type) ACCELERATOR_TYPE=$value ;;
          --runtime-version) RUNTIME_VERSION=$value ;;
          --num-slices) NUM_SLICES=$value ;;
          --ssh-flag) TPU_SSH_FLAGS+=("$value") ;;
        esac
        ;;
      --queued) QUEUED=1 && shift ;;
      --tpu-vm) QUEUED=0 && explicit_tpu_vm=1 && shift ;;
      --spot) SPOT=1 && shift ;;
      --reserved) RESERVED=1 && shift ;;
      --dry-run) DRY_RUN=1 && shift ;;
      -h | --help)
        usage
        exit 0
        ;;
      --)
        TPU_REST+=("$@")
        break
        ;;
      *)
        TPU_REST+=("$1")
        shift
        ;;
    esac
  done
  if ((explicit_tpu_vm && NUM_SLICES > 1)); then
    tpu_die "--tpu-vm and --num-slices $NUM_SLICES exclude each other: multi-slice is a queued resource"
  fi
  tpu_check_settings
}

tpu_check_settings() {
  [[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || tpu_die "NUM_SLICES must be a positive integer, not '$NUM_SLICES'"
  # Multi-slice (DCN) needs a queued resource: only it creates the slices together and
  # gives their workers the MEGASCALE_* settings that join them.
  if ((NUM_SLICES > 1)); then
    QUEUED=1
  fi
  local flag
  for flag in "${TPU_SSH_FLAGS[@]+"${TPU_SSH_FLAGS[@]}"}"; do
    [[ $flag =~ ^--[a-z][-a-z0-9]*(=[^[:space:]]*)?$ ]] ||
      tpu_die "--ssh-flag takes one gcloud flag like --internal-ip, not '$flag'"
  done
  if ((SPOT && RESERVED)); then
    tpu_die "--spot and --reserved exclude each other"
  fi
  case $ACCELERATOR_TYPE in
    v5e-*) ACCELERATOR_TYPE="v5litepod-${ACCELERATOR_TYPE#v5e-}" ;;  # gcloud's name for v5e
  esac
  if [[ -n $ACCELERATOR_TYPE && ! $ACCELERATOR_TYPE =~ ^v[0-9a-z]+-[1-9][0-9]*$ ]]; then
    tpu_die "ACCELERATOR_TYPE must look like v5p-32, v5e-16, v6e-8 or v4-32, not '$ACCELERATOR_TYPE'"
  fi
}

# Dies with one line naming the first missing required setting: project, zone, name.
tpu_require_target() {
  [[ -n $PROJECT ]] || tpu_die "no project: pass --project ID or set PROJECT"
  [[ -n $ZONE ]] || tpu_die "no zone: pass --zone ZONE or set ZONE"
  [[ -n $TPU_NAME ]] || tpu_die "no TPU name: pass --name NAME or set TPU_NAME"
  # Cloud TPU node ids: lowercase letters, digits and hyphens, starting with a letter.
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    tpu_die "TPU name '$TPU_NAME' must be lowercase letters, digits and hyphens, starting with a letter"
}

tpu_require_accelerator() {
  [[ -n $ACCELERATOR_TYPE ]] ||
    tpu_die "no accelerator type: pass --accelerator-type TYPE (e.g. v5p-32) or set ACCELERATOR_TYPE"
}

# The TPU software version for the accelerator's generation (Cloud TPU "TPU software
# versions" page: v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite,
# v4 and older tpu-ubuntu2204-base).
tpu_runtime_version() {
  if [[ -n $RUNTIME_VERSION ]]; then
    echo "$RUNTIME_VERSION"
    return
  fi
  case $ACCELERATOR_TYPE in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v4-* | v3-* | v2-*) echo tpu-ubuntu2204-base ;;
    *) tpu_die "no default runtime version for '$ACCELERATOR_TYPE': pass --runtime-version" ;;
  esac
}

# Hosts (TPU VM workers) in one slice of ACCELERATOR_TYPE; 0 when the type is not known.
# v4 and v5p count TensorCores (2 per chip), v5e and v6e count chips; a host has 4 chips,
# except the single-host v5e / v6e shapes of up to 8 chips.
tpu_hosts_per_slice() {
  local n=${ACCELERATOR_TYPE##*-}
  case $ACCELERATOR_TYPE in
    v4-* | v5p-*) echo $(((n / 2 + 3) / 4)) ;;
    v5litepod-* | v6e-*) if ((n <= 8)); then echo 1; else echo $((n / 4)); fi ;;
    *) echo 0 ;;
  esac
}

# The TPU nodes (slices) by name: a TPU VM or a single-slice queued resource has one node
# named TPU_NAME; a multi-slice queued resource made with --node-prefix TPU_NAME has
# TPU_NAME-0 ... TPU_NAME-(N-1).
tpu_node_names() {
  if ((NUM_SLICES > 1)); then
    local i
    for ((i = 0; i < NUM_SLICES; i++)); do
      echo "$TPU_NAME-$i"
    done
  else
    echo "$TPU_NAME"
  fi
}

# Quotes one word for a POSIX shell, leaving it bare when that is safe; `--flag=value` keeps
# the flag bare and quotes the value.
tpu_quote() {
  local word=$1
  local safe='^[A-Za-z0-9_./:=@%+,~-]+$'
  if [[ $word =~ $safe ]]; then
    printf '%s' "$word"
  elif [[ $word =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    tpu_quote "${BASH_REMATCH[2]}"
  else
    local q="'\\''"
    printf "'%s'" "${word//\'/$q}"
  fi
}

tpu_join() {  # the words, quoted, on one line
  local word sep=""
  for word in "$@"; do
    printf '%s' "$sep"
    tpu_quote "$word"
    sep=" "
  done
  printf '\n'
}

# Prints a command; runs it unless --dry-run. The dry run's output is a shell script: one
# command per line, comments for what the real run decides from gcloud's answers.
tpu_run() {
  if ((DRY_RUN)); then
    tpu_join "$@"
  else
    printf '+ %s' "$(tpu_join "$@")" >&2
    printf '\n' >&2
    "$@"
  fi
}

tpu_note() {  # a comment in the dry run's script; a plain message otherwise
  if ((DRY_RUN)); then
    printf '# %s\n' "$1"
  else
    printf '%s: %s\n' "$TPU_PROG" "$1" >&2
  fi
}

# Every worker of every slice: hosts per slice x slices; 0 when the type is not known.
tpu_total_hosts() {
  echo $(($(tpu_hosts_per_slice) * NUM_SLICES))
}

# The flags every ssh and scp gets: the user's (--ssh-flag), then, for a queued resource
# whose host count is known, a batch that holds every worker: `queued-resources ssh/scp`
# reach `--worker=all` 64 hosts at a time by default (their gcloud reference pages), and a
# command that waits for all hosts (jax.distributed) would never return. `tpu-vm ssh/scp`
# reach all workers at once and take no --batch-size.
tpu_worker_flags() {
  local hosts
  hosts=$(tpu_total_hosts)
  TPU_WORKER_FLAGS=("${TPU_SSH_FLAGS[@]+"${TPU_SSH_FLAGS[@]}"}")
  if ((QUEUED && hosts > 0)); then
    TPU_WORKER_FLAGS+=("--batch-size=$hosts")
  fi
}

# Runs a shell command on every worker of every slice (`--worker=all`, and `--node=all` for a
# queued resource).
tpu_ssh_all() {
  local command=$1
  tpu_worker_flags
  if ((QUEUED)); then
    tpu_run gcloud compute tpus queued-resources ssh "$TPU_NAME" "--project=$PROJECT" \
      "--zone=$ZONE" --node=all --worker=all "${TPU_WORKER_FLAGS[@]+"${TPU_WORKER_FLAGS[@]}"}" \
      "--command=$command"
  else
    tpu_run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--project=$PROJECT" "--zone=$ZONE" \
      --worker=all "${TPU_WORKER_FLAGS[@]+"${TPU_WORKER_FLAGS[@]}"}" "--command=$command"
  fi
}

# Copies a local file to every worker of every slice, to the path DEST under $HOME.
tpu_scp_all() {
  local file=$1 dest=$2
  tpu_worker_flags
  if ((QUEUED)); then
    tpu_run gcloud compute tpus queued-resources scp "$file" "$TPU_NAME:$dest" \
      "--project=$PROJECT" "--zone=$ZONE" --node=all --worker=all \
      "${TPU_WORKER_FLAGS[@]+"${TPU_WORKER_FLAGS[@]}"}"
  else
    tpu_run gcloud compute tpus tpu-vm scp "$file" "$TPU_NAME:$dest" "--project=$PROJECT" \
      "--zone=$ZONE" --worker=all "${TPU_WORKER_FLAGS[@]+"${TPU_WORKER_FLAGS[@]}"}"
  fi
}

# A remote shell snippet that sets W to this worker's index within its slice.
# LLAVA_JAX_WORKER_ID overrides the metadata server (used by the tests to run the remote
# commands on a machine that is not a TPU VM).
tpu_remote_worker_id() {
  printf '%s' "W=\${LLAVA_JAX_WORKER_ID:-\$(curl -sf -H \"Metadata-Flavor: Google\" $TPU_WORKER_ID_URL)}; [ -n \"\$W\" ]"
}

tpu_check_run_name() {  # RUN: it names a directory on every worker
  [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
    tpu_die "run name '$1' must be letters, digits, '.', '_' and '-'"
}

# A remote shell function: `alive PIDFILE` succeeds when the process the file names is still
# the venv's llava-jax (not a later process that happens to reuse the pid).
tpu_remote_alive() {
  # shellcheck disable=SC2016  # remote code: expands on the worker
  printf '%s' 'alive() { [ -f "$1" ] && grep -qa "bin/llava-jax" "/proc/$(cat "$1")/cmdline" 2>/dev/null; }'
}
