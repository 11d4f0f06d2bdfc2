#!/usr/bin/env bash
# The main job: set up, then reproduce the default pipeline (dvc repro) on the embedded Fashion-MNIST grid.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${BITBENCH_VENV:-$HOME/.venvs/bitbench}"
export PATH="$VENV/bin:$PATH" DVC_NO_ANALYTICS=1
dvc repro "$@"
