# Default environment-setup hook, sourced by the batch script from the repository root (REPO)
# before the launch, on the first node only (srun passes the environment on to every task).
# For a site-specific set-up copy this file and submit with slurm.setup=/path/to/copy, e.g.:
#   module load cuda/12.4 nccl
#   source ~/miniforge3/bin/activate worldline
if [[ -f "$REPO/.venv/bin/activate" ]]; then
  source "$REPO/.venv/bin/activate"
fi
export PYTHONUNBUFFERED=1
# Compiled-kernel caches inside the run dir, never in $HOME (shared home directories are slow
# and collide across jobs).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$RUN_DIR/.cache/torch_extensions}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$RUN_DIR/.cache/triton}
# CPU threads per rank: the task's CPUs shared by the ranks of the node.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-1} / ${NPROC_PER_NODE:-1} > 0 ? ${SLURM_CPUS_PER_TASK:-1} / ${NPROC_PER_NODE:-1} : 1 ))}
