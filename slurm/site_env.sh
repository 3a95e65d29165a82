# shellcheck shell=bash
# Site settings, sourced by slurm/launch.sh in the batch shell before srun starts the ranks
# (srun --export=ALL passes them on, also into pyxis containers). Copy this file, edit it for
# your cluster and point COPD_SITE_ENV at the copy, or edit it in your checkout.
# Everything below the first block is commented out: the right values depend on the fabric.

# --- always useful ------------------------------------------------------------------------------
# Megatron overlaps TP communication with compute only if kernels are queued in order.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# A rank whose NCCL collective fails or times out tears the process down (instead of hanging),
# so srun --wait ends the job and the requeue/resume path can take over.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Python tracebacks of every thread on SIGSEGV/SIGABRT land in the job log.
export PYTHONFAULTHANDLER=${PYTHONFAULTHANDLER:-1}

# --- modules / software environment ---------------------------------------------------------
# module load cuda/12.8 nccl/2.27           # bare metal only; containers bring their own

# --- NCCL: debugging ------------------------------------------------------------------------------
# export NCCL_DEBUG=INFO                     # WARN in production; INFO prints the rings/trees and
# export NCCL_DEBUG_SUBSYS=INIT,NET          #   which network (IB / socket) each rank chose
# export TORCH_DISTRIBUTED_DEBUG=DETAIL      # checks collectives match across ranks (slow)
# export TORCH_NCCL_DUMP_ON_TIMEOUT=1        # flight-recorder dump of the last collectives on hang
# export TORCH_NCCL_TRACE_BUFFER_SIZE=2000

# --- NCCL: network selection ------------------------------------------------------------------
# Bootstrap / socket traffic: the interface that reaches the other nodes (not lo, not docker0).
# export NCCL_SOCKET_IFNAME=ib0               # or eth0, bond0, ^lo,docker0 (exclude list)
# export GLOO_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME
# InfiniBand / RoCE HCAs to use (see `ibv_devinfo`); RoCE also needs the right GID index.
# export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7
# export NCCL_IB_GID_INDEX=3                 # RoCE v2 usually 3
# export NCCL_IB_TIMEOUT=22                  # IB verbs timeout exponent; raise on big fabrics
# export NCCL_IB_RETRY_CNT=13
# export NCCL_IB_DISABLE=1                   # force sockets (debugging only: very slow)
# export NCCL_NET_GDR_LEVEL=PHB              # GPUDirect RDMA distance
# AWS EFA (p4d/p5): the aws-ofi-nccl plugin.
# export FI_PROVIDER=efa
# export FI_EFA_USE_DEVICE_RDMA=1
# export NCCL_PROTO=simple

# --- timeouts -----------------------------------------------------------------------------------
# torch.distributed's collective timeout is set by copd (30 min); NCCL's own watchdog:
# export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=600
# export TORCH_NCCL_ENABLE_MONITORING=1

# --- caches on shared file systems --------------------------------------------------------------
# Triton / TE / torch compile caches per node, not on NFS/Lustre (thousands of small files).
# export TRITON_CACHE_DIR=/tmp/triton-$SLURM_JOB_ID
# export HF_HOME=/scratch/$USER/hf          # only tools/import_from_hf.py reads HF files
