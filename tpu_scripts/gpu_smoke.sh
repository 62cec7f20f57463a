#!/usr/bin/env bash
# GPU smoke test on one machine with an NVIDIA GPU: parity with transformers on the GPU, a
# short tiny training, and a OneVision-0.5B bf16 throughput probe with MFU.
#
#   pip install -e '.[test]' 'jax[cuda12]'   # or jax[cuda13], to match the driver
#   tpu_scripts/gpu_smoke.sh [--steps 300] [--out smoke.json]
#
# Without a GPU it prints why and exits 0. Arguments go to `python -m llava_jax.checks.gpu_smoke`
# (see its --help).
set -euo pipefail

if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
  exec "${PYTHON:-python3}" -m llava_jax.checks.gpu_smoke --help
fi
exec "${PYTHON:-python3}" -m llava_jax.checks.gpu_smoke "$@"
