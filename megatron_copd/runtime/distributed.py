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
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        cpu_compat.activate()
        backend = "gloo"
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


def device() -> torch.device:
    """The device this rank computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
