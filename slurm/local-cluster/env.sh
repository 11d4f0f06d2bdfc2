# Source this file to point SLURM's client commands (sbatch, squeue, sinfo, srun, ...) at the private
# single-machine cluster of slurm/local-cluster/start.sh. Nothing here starts a daemon.
_bitbench_cluster_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# All state (config, munge key and socket, spool, logs, pid files) lives in one folder. A short path under /tmp
# keeps the munge socket path well under the 108-byte limit of Unix sockets.
export SLURM_DIR="${SLURM_DIR:-/tmp/bitbench-slurm}"
export SLURM_CONF="$SLURM_DIR/etc/slurm.conf"
# The sacct shim (no accounting database here) must come before /usr/bin on PATH, inside jobs too.
case ":$PATH:" in
  *":$_bitbench_cluster_dir/bin:"*) ;;
  *) export PATH="$_bitbench_cluster_dir/bin:$PATH" ;;
esac
unset _bitbench_cluster_dir
