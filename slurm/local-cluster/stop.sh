#!/usr/bin/env bash
# Stops the single-machine SLURM cluster of start.sh: cancels its jobs, then ends the daemons by pid file.
# Idempotent: daemons that are not running are skipped. --keep-munge leaves munged running.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
export PATH="$PATH:/usr/sbin:/sbin"
daemons="slurmd slurmctld munged"
[ "${1:-}" = "--keep-munge" ] && daemons="slurmd slurmctld"

pid_of() { [ -s "$SLURM_DIR/run/$1.pid" ] && cat "$SLURM_DIR/run/$1.pid"; }
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }

# Cancel the jobs first so that no training process outlives its slurmstepd.
ctld="$(pid_of slurmctld)"
if alive "$ctld" && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
  scancel --user="$(id -un)" 2>/dev/null
  for _ in $(seq 20); do [ -z "$(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && break; sleep 0.5; done
fi

for d in $daemons; do
  pid="$(pid_of "$d")"
  if alive "$pid"; then
    kill "$pid"
    for _ in $(seq 40); do alive "$pid" || break; sleep 0.25; done
    alive "$pid" && kill -9 "$pid" 2>/dev/null
  fi
  rm -f "$SLURM_DIR/run/$d.pid"
done
echo "local-cluster: stopped"
exit 0
