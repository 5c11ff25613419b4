# Recommended NCCL / PyTorch-distributed settings for multi-node GPU jobs (sourced by the batch
# script when slurm.nccl=true and GPUs are requested). Values already in the environment win.
# A failed or stuck collective aborts the process group and raises, instead of hanging the job
# until the time limit (then the batch script sees a failure, not a stop, and does not requeue).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# On a collective timeout, dump the flight recorder so the stuck rank can be found.
export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
# FSDP2: free communication buffers without recordStream (lower, steadier memory; torchtitan's
# default).
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
# Warnings only; NCCL_DEBUG=INFO prints the chosen transports (IB/RoCE vs sockets) when
# diagnosing slow all-reduces.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Site-specific, leave to the cluster's documentation:
#   NCCL_SOCKET_IFNAME=ib0|eth0   the interface used for bootstrap / socket transport
#   NCCL_IB_HCA=mlx5              which InfiniBand adapters to use
#   NCCL_CROSS_NIC=1, NCCL_NET_GDR_LEVEL=...   topology tuning
