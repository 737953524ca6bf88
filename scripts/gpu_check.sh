#!/usr/bin/env bash
# One-shot validation of the CUDA backend on a machine with an NVIDIA GPU, nvcc and a CUDA build of
# torch (nothing is downloaded): build for the local GPU, render tests, compute-sanitizer memcheck
# and racecheck, renderer benchmark, GSDD Table 20 task; writes RESULTS_DIR/render_cuda.{md,json}
# and RESULTS_DIR/logs/, prints a one-screen summary. Each step is time-boxed; a failing step does
# not stop the later ones; the whole run keeps to --budget-s (default 420 s). See docs/gpu_check.md.
#
#   bash scripts/gpu_check.sh RESULTS_DIR [--dry-run] [--export DIR] [--budget-s S]
#                             [--table20-steps N] [--table20-images N]
#
#   bash scripts/gpu_check.sh benchmarks/results                  # on the GPU machine
#   bash scripts/gpu_check.sh /tmp/gc --dry-run                   # anywhere: GPU steps skipped
#
# Exit status: 0 when every step that ran passed (skipped steps, and a compute-sanitizer that refuses
# the device, "unsupported", included), 1 otherwise, 2 on bad
# arguments.
set -uo pipefail
# Paths given on the command line are relative to the caller's directory; the steps run at the
# repository root.
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash scripts/gpu_check.sh RESULTS_DIR [--dry-run] [--export DIR] [--budget-s S]" \
       "[--table20-steps N] [--table20-images N]" >&2
  exit 2
fi
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu_check: error: $PY not found (set PYTHON=...)" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
exec "$PY" "$HERE/benchmarks/gpu_check.py" "$@"
