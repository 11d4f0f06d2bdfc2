#!/usr/bin/env bash
# Installs everything bitbench needs on Debian 12 as root; idempotent (a second run only checks).
# The virtual environment lives outside the checkout so clones share it: $BITBENCH_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BITBENCH_VENV:-$HOME/.venvs/bitbench}"
# g++, python3-dev, ninja-build: the fused CPU kernels (baselines/fused.py) are compiled on first use; torch's
# cpp_extension runs `ninja` from PATH, so the apt binary (/usr/bin/ninja), not the pip wheel in the venv.
APT_PACKAGES="dataset-fashion-mnist slurmctld slurmd slurm-client munge g++ python3-dev ninja-build"

missing=""
for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
python3 -c 'import ensurepip, venv' 2>/dev/null || missing="$missing python3-venv"
if [ -n "$missing" ]; then
  echo "setup: apt-get install$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# torch first and pinned: pip must take the local 2.14.1 build, never download another one.
"$VENV/bin/python" -c 'import torch, torchvision, sys; sys.exit(torch.__version__.split("+")[0] != "2.14.1")' 2>/dev/null \
  || "$VENV/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/pip" install -q -e '.[test]' 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
"$VENV/bin/python" -c 'import benchmark, baselines, bitat' || { echo "setup: bitbench did not install" >&2; exit 1; }
echo "setup: ready ($VENV)"
