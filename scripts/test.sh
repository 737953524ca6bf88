#!/usr/bin/env bash
# The test command: the core suite and every plugin's suite. CUDA tests skip without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m pytest -q -p no:cacheprovider tests plugins "$@"
