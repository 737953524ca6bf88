#!/usr/bin/env bash
# Installs splatdd and every plugin in this checkout on a fresh machine (Debian + CPython >= 3.10).
#
#   bash scripts/install.sh            # CUDA backend built when nvcc is found (SPLATDD_CUDA=AUTO)
#   SPLATDD_CUDA=OFF bash scripts/install.sh   # CPU backend only (faster build)
#
# Order matters: torch==2.13.0 first (a local CPU wheel here), so that no later requirement makes
# pip fetch a newer CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${SPLATDD_SKIP_APT:-}" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

$PY -m pip install -q torch==2.13.0
$PY -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" numpy safetensors tqdm matplotlib pillow tomli-w \
    pytest hypothesis
# The compiled module: CPU always, CUDA when nvcc is found (or SPLATDD_CUDA=ON).
if [ -z "${SPLATDD_CUDA:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
$PY -m pip install -q --no-build-isolation -e .
# Plugins: each is its own distribution. torch is already satisfied, so pip adds nothing heavy.
for p in plugins/*/; do
  [ -f "$p/pyproject.toml" ] || continue
  $PY -m pip install -q -e "$p"
done
$PY -c "import splatdd; from splatdd import _C; print('splatdd', splatdd.__version__, '| compiled backends:', _C.backends(), '| usable here:', splatdd.backends())"
