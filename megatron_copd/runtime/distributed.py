"""torch.distributed start-up from torchrun, srun or the local launcher.

One entry point, :func:`init_distributed`, reads the launcher's environment, picks the backend
(NCCL with CUDA, gloo otherwise; on CPU it also switches on the megatron CPU compatibility layer)
and initialises the default process group.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_copd.errors import UserError
from megatron_copd.runtime import cpu_compat


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as told by its launcher."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "local" | "single"


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if nodelist:
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                check=True,
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")


def launch_env() -> LaunchEnv:
    """Read rank/world/master from torchrun (RANK...), SLURM (SLURM_PROCID...) or nothing."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = env.get("COPD_LAUNCHER", "torchrun")
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher=launcher,
        )
    # Only inside an srun step: the batch script itself also has SLURM_PROCID=0 and the job's
    # SLURM_NTASKS, but no SLURM_STEP_ID; run there, copd must not wait for ranks that never come.
    if (
        "SLURM_STEP_ID" in env
        and "SLURM_PROCID" in env
        and int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1) > 1
    ):
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or _slurm_master_addr(),
            master_port=int(env.get("MASTER_PORT", 20000 + job % 20000)),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(env: LaunchEnv | None = None, timeout_s: int = 1800) -> LaunchEnv:
    """Initialise the default process group (idempotent). Returns the launch environment."""
    env = env or launch_env()
    if dist.is_initialized():
        return env
    if env.launcher == "local":
        from megatron_copd.runtime.launch import die_with_launcher

        die_with_launcher()
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = choose_backend(devices, ranks_on_node(env), os.environ.get("COPD_DIST_BACKEND"))
    if devices:
        # Ranks beyond the device count share GPUs (round robin): only with gloo, see below.
        torch.cuda.set_device(env.local_rank % devices)
        if backend == "gloo" and env.local_rank == 0:
            print(
                f"copd: {ranks_on_node(env)} ranks share {devices} GPU(s); NCCL refuses two "
                "ranks on one GPU, so collectives use gloo (slow: for tests and demos only)",
                flush=True,
            )
    else:
        cpu_compat.activate()
        _share_cpu_threads(env)
    # HyperCommGrid reads WORLD_SIZE from the environment.
    os.environ["WORLD_SIZE"] = str(env.world_size)
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return env


def _share_cpu_threads(env: LaunchEnv) -> None:
    """CPU ranks on one machine split its cores instead of each spawning one thread per core:
    with N ranks x N threads the cores are oversubscribed and OpenMP's spinning makes every small
    op many times slower (measured: a 128-wide RMSNorm taking 30 ms). OMP_NUM_THREADS wins."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    local = ranks_on_node(env) or (env.world_size if env.launcher in ("local", "single") else 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def ranks_on_node(env: LaunchEnv) -> int | None:
    """How many ranks of this node see the *same* CUDA devices (None: unknown).

    torchrun and the local launcher start every local rank with the same visible devices, so
    more ranks than devices means ranks share GPUs. Under SLURM each task may be bound to its own
    GPU (``--gpus-per-task``, ``--gpu-bind``), so one visible device per task proves nothing:
    None (NCCL; ``COPD_DIST_BACKEND=gloo`` forces sharing)."""
    if env.launcher == "slurm":
        return None
    value = os.environ.get("LOCAL_WORLD_SIZE")
    if value is not None:
        return int(value) if value.isdigit() else None
    return env.world_size if env.launcher in ("local", "single") else None


def choose_backend(cuda_devices: int, ranks_here: int | None, override: str | None = None) -> str:
    """gloo without GPUs; NCCL when every rank on the node has a GPU of its own; gloo when ranks
    must share GPUs (NCCL refuses two ranks on one device, e.g. 2 branches on 1 GPU).
    ``override`` (env ``COPD_DIST_BACKEND``) forces one."""
    if override:
        if override not in ("nccl", "gloo"):
            raise UserError(f"COPD_DIST_BACKEND: expected 'nccl' or 'gloo', got {override!r}")
        if override == "nccl" and cuda_devices == 0:
            raise UserError("COPD_DIST_BACKEND=nccl: no CUDA device on this machine")
        return override
    if cuda_devices == 0:
        return "gloo"
    if ranks_here is not None and ranks_here > cuda_devices:
        return "gloo"
    return "nccl"


def needs_host_staging(group, tensor: torch.Tensor) -> bool:
    """A CUDA tensor over a group whose backend cannot move CUDA memory point to point (gloo
    send/recv take host memory only)."""
    if not tensor.is_cuda:
        return False
    backend = str(dist.get_backend(group)).lower()
    return "nccl" not in backend and "cuda" not in backend


def batch_p2p(ops: list[dist.P2POp], stage: bool | None = None) -> None:
    """``batch_isend_irecv`` + wait, copying CUDA tensors through host memory when the group's
    backend needs it (``stage=None``: decide per op; True/False: force). Receive buffers hold
    the data when this returns."""
    if not ops:
        return
    posted, copy_back = [], []
    for op in ops:
        t = op.tensor
        if stage if stage is not None else needs_host_staging(op.group, t):
            if op.op is dist.isend:
                host = t.detach().to("cpu", copy=True)
            else:
                host = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                copy_back.append((t, host))
            op = dist.P2POp(op.op, host, op.peer, op.group, op.tag)
        posted.append(op)
    for work in dist.batch_isend_irecv(posted):
        work.wait()
    for dst, host in copy_back:
        dst.copy_(host)


def device() -> torch.device:
    """The device this rank computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
