#!/usr/bin/env bash
# The OneVision-0.5B train step on one GPU, the XLA paths next to the fused ones (issue 13):
#
#   xla     train.attention=xla,  train.loss_impl=chunked  (BENCHMARKS.md's 16.2% on an H200)
#   cudnn   train.attention=auto, train.loss_impl=chunked  (cuDNN flash attention)
#   fused   train.attention=auto, train.loss_impl=auto     (and the blockwise loss)
#
# Each row is `python -m llava_jax.checks.gpu_smoke --skip parity training` (its throughput probe:
# SigLIP so400m + Qwen2-0.5B, all parts training, bf16, B=8, T=2048 unless given), one
# process per row, same machine; the table prints ms/step, tokens/s and MFU, and each row's
# JSON goes to $OUT (or ./device_check/).
#
#   benchmarks/device_check.sh [gpu_smoke probe arguments, e.g. --batch 8 --seq-len 2048]
#
# Needs jax with CUDA and the project's dependencies. On a machine without internet that has
# jax[cuda], flax, optax, orbax, transformers (the device tool's image), the rest travel as
# wheels in $WHEELS (default .whl), fetched once where pip works:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0 qwix==0.1.8 portpicker==1.6.0
# They are installed into a scratch folder (nothing from the internet); a package still
# missing is named and the script stops.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
out=${OUT:-device_check}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error

missing() {
  "$PYTHON" - <<'PY'
import importlib.util
need = ("jax", "flax", "optax", "orbax", "grain", "array_record", "ml_collections", "qwix",
        "portpicker", "etils", "yaml", "transformers", "safetensors", "PIL")
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
}

if [[ -n "$(missing)" && -d "$WHEELS" ]]; then
  site=$(mktemp -d /tmp/llava-jax-site.XXXXXX)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$site"
fi
if [[ -n "$(missing)" ]]; then
  echo "device_check: missing Python packages: $(missing); put their wheels in $WHEELS" >&2
  exit 2
fi
if ! "$PYTHON" -c "import jax, sys; sys.exit(0 if jax.devices('gpu') else 1)" 2>/dev/null; then
  echo "device_check: JAX sees no GPU (jax with CUDA on a machine with an NVIDIA GPU)" >&2
  exit 1
fi

mkdir -p "$out"
"$PYTHON" -c "import jax; print('jax', jax.__version__, 'on', jax.devices()[0].device_kind)"
rows=("xla xla chunked" "cudnn auto chunked" "fused auto auto")
for row in "${rows[@]}"; do
  read -r name attention loss <<<"$row"
  "$PYTHON" -m llava_jax.checks.gpu_smoke --skip parity training --attention "$attention" \
    --loss "$loss" --out "$out/$name.json" "$@"
done

"$PYTHON" - "$out" <<'PY'
import json, sys
print("| run | attention | loss | ms/step | tokens/s | MFU |")
print("|---|---|---|---|---|---|")
for name in ("xla", "cudnn", "fused"):
    r = json.load(open(f"{sys.argv[1]}/{name}.json"))["throughput"]
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    print(f"| {name} | {r['attention']} | {r['loss_impl']} | {1e3 * r['step_s']:.0f} | "
          f"{r['tokens_per_s']:,.0f} | {mfu} |")
PY
