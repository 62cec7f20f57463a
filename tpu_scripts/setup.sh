#!/usr/bin/env bash
# Installs llava-jax on every worker: Python, a virtual environment, the project with its
# [tpu] extras, from a git ref or from a wheel built here.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<EOF
Usage: $TPU_PROG [settings] (--repo URL [--ref REF] | --wheel FILE.whl) [--check]

On every worker (--worker=all; --node=all for a queued resource): installs PYTHON when it
is missing (apt), makes ~/$TPU_VENV_DIR, and installs "llava-jax[EXTRAS]" into it:
  --repo URL     from git: pip install "llava-jax[tpu] @ git+URL@REF"  (REPO_URL)
  --ref REF      a branch, tag or commit; default main                 (GIT_REF)
  --wheel FILE   a wheel built here (python -m build --wheel), copied to every worker
                 with gcloud ... scp, then pip install "llava-jax[tpu] @ file://..."
Options:
  --python NAME  the interpreter to use; default python3.11 (the project needs >= 3.11;
                 the TPU images' python3 is older)                     (PYTHON)
  --extras LIST  default tpu: jax, jaxlib and libtpu at the versions pinned in
                 pyproject.toml, and gcsfs                              (EXTRAS)
  --check        then start jax on all workers at once (on a queued resource one
                 ssh batch: needs --accelerator-type) and print each process's index, the global device
                 count and the jax / libtpu versions (needs the TPU idle)
Running it again reinstalls llava-jax (dependencies are kept).
$(tpu_settings_help)
EOF
}

tpu_parse "$@"
repo=${REPO_URL:-}
ref=${GIT_REF:-main}
wheel=""
python=${PYTHON:-python3.11}
extras=${EXTRAS:-tpu}
check=0
set -- "${TPU_REST[@]+"${TPU_REST[@]}"}"
while (($#)); do
  case $1 in
    --repo | --ref | --wheel | --python | --extras)
      (($# > 1)) || tpu_die "$1 needs a value"
      case $1 in
        --repo) repo=$2 ;;
        --ref) ref=$2 ;;
        --wheel) wheel=$2 ;;
        --python) python=$2 ;;
        --extras) extras=$2 ;;
      esac
      shift 2
      ;;
    --repo=*) repo=${1#*=} && shift ;;
    --ref=*) ref=${1#*=} && shift ;;
    --wheel=*) wheel=${1#*=} && shift ;;
    --python=*) python=${1#*=} && shift ;;
    --extras=*) extras=${1#*=} && shift ;;
    --check) check=1 && shift ;;
    *) tpu_die "unknown option '$1' (see --help)" ;;
  esac
done
tpu_require_target
if ((check && QUEUED)) && (($(tpu_total_hosts) == 0)); then
  tpu_die "--check needs --accelerator-type: every worker must start jax at once, in one ssh batch"
fi

# Everything below lands inside double quotes in the remote command: no quotes, spaces, $.
safe='^[A-Za-z0-9_./:@+~%=,-]+$'
[[ $python =~ ^python3\.[0-9]+$ ]] || tpu_die "--python must name an interpreter like python3.11, not '$python'"
[[ $extras =~ ^[a-z0-9_,-]*$ ]] || tpu_die "--extras must be a comma-separated list of extras, not '$extras'"
extras_spec=""
[[ -n $extras ]] && extras_spec="[$extras]"
if [[ -n $wheel ]]; then
  [[ -z $repo ]] || tpu_die "give --repo or --wheel, not both"
  [[ -f $wheel ]] || tpu_die "wheel '$wheel' not found"
  [[ $wheel == *.whl ]] || tpu_die "'$wheel' is not a wheel (.whl)"
  wheel_name=$(basename "$wheel")
  [[ $wheel_name =~ $safe ]] || tpu_die "wheel file name '$wheel_name' has characters pip URLs cannot hold"
  requirement="llava-jax$extras_spec @ file://\$HOME/$wheel_name"
else
  [[ -n $repo ]] || tpu_die "nothing to install: pass --repo URL (or set REPO_URL) or --wheel FILE"
  [[ $repo =~ $safe ]] || tpu_die "repository URL '$repo' has characters a pip URL cannot hold"
  [[ $ref =~ $safe && $ref != *@* ]] || tpu_die "git ref '$ref' has characters a pip URL cannot hold"
  repo=${repo#git+}
  requirement="llava-jax$extras_spec @ git+$repo@$ref"
fi

venv="\$HOME/$TPU_VENV_DIR"
apt_install="sudo apt-get -o DPkg::Lock::Timeout=600 update -qq && sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq $python $python-venv"
install=(
  "set -euo pipefail"
  # A missing interpreter or a missing ensurepip (Ubuntu's $python-venv) fails the first try.
  "test -x $venv/bin/pip || $python -m venv $venv || { $apt_install && $python -m venv $venv; }"
  "$venv/bin/pip install -q --upgrade pip"
  "$venv/bin/pip uninstall -q -y llava-jax || true"
  "$venv/bin/pip install -q \"$requirement\""
  "$venv/bin/llava-jax --help >/dev/null"
  "echo \"\$(hostname): llava-jax installed in $venv\""
)
remote=$(printf '%s; ' "${install[@]}")

if [[ -n $wheel ]]; then
  tpu_scp_all "$wheel" ""
fi
tpu_ssh_all "${remote%; }"

if ((check)); then
  # Every worker must start jax at the same time: jax.distributed finds the others through
  # the TPU metadata (and, with several slices, the MEGASCALE_* settings).
  probe="import jax, importlib.metadata as m; jax.distributed.initialize(); print(jax.process_index(), jax.process_count(), jax.device_count(), jax.__version__, m.version('libtpu'))"
  tpu_ssh_all "echo \"\$(hostname) (process, processes, devices, jax, libtpu): \$($venv/bin/python -c \"$probe\")\""
fi
