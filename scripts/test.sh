#!/usr/bin/env bash
# Set up, start the single-machine SLURM cluster, run the whole test suite, stop the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${BITBENCH_VENV:-$HOME/.venvs/bitbench}"
export PATH="$VENV/bin:$PATH" DVC_NO_ANALYTICS=1
source slurm/local-cluster/env.sh
bash slurm/local-cluster/start.sh
trap 'bash slurm/local-cluster/stop.sh' EXIT
set +e
python -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is a failure of the suite, not a pass.
[ "$rc" -eq 5 ] && echo "test: no tests were collected" >&2
exit "$rc"
