#!/usr/bin/env bash
# Installs splatdd and every plugin in this checkout, editable (docs/install.md), on a fresh machine
# (Debian + CPython >= 3.10), into the environment of $PYTHON (default python3; a venv's python, or
# python3 with the venv activated, installs into that venv).
#
#   bash scripts/install.sh                    # CUDA backend built when nvcc is found (SPLATDD_CUDA=AUTO)
#   SPLATDD_CUDA=OFF bash scripts/install.sh   # CPU backend only (faster build)
#   SPLATDD_CUDA=ON  bash scripts/install.sh   # fail without nvcc (.ci/run)
#
# Order matters: torch==2.13.0 first (a local CPU wheel here), so that no later requirement makes
# pip fetch a newer CUDA build of torch; then the build requirements of the core and of every
# plugin (scripts/build_wheels.sh --deps-only: installed and checked, a missing one is named), and
# only then the --no-build-isolation installs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHON=$PY

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${SPLATDD_SKIP_APT:-}" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

say() { echo "[install] $(date +%T) $*" >&2; }
say "torch==2.13.0"
$PY -m pip install -q torch==2.13.0
say "build requirements of the core and every plugin"
bash scripts/build_wheels.sh --deps-only
# The compiled module: CPU always, CUDA when nvcc is found (or SPLATDD_CUDA=ON).
if [ -z "${SPLATDD_CUDA:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
# (its runtime requirements and the `test` extra's come with it; torch is already satisfied)
if [ "${SPLATDD_CUDA:-AUTO}" = OFF ] || ! command -v nvcc > /dev/null; then
  say "compiling splatdd._C, CPU backend (about 1 minute on 2 cores; pip is quiet meanwhile)"
else
  say "compiling splatdd._C, CPU and CUDA backends (several minutes on 2 cores; pip is quiet meanwhile)"
fi
$PY -m pip install -q --no-build-isolation -e ".[test]"
# Plugins: each is its own distribution (every plugins/*/ with a pyproject.toml), in one pip call.
PLUGINS=()
for p in plugins/*/; do
  if [ -f "$p/pyproject.toml" ]; then PLUGINS+=(-e "${p%/}"); fi
done
say "the plugins (every plugins/*/), editable"
[ "${#PLUGINS[@]}" -eq 0 ] || $PY -m pip install -q --no-build-isolation "${PLUGINS[@]}"
$PY -c "import splatdd; from splatdd import _C; print('splatdd', splatdd.__version__, '| compiled backends:', _C.backends(), '| usable here:', splatdd.backends())"
$PY -c "import sys; from splatdd.cli import main; sys.exit(main(['plugins', '--strict']))"
