"""`copd train` / `copd eval`: validate the config, then either start the local worker processes
(run plainly) or run this process's rank (under torchrun / srun / the local launcher)."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import NoReturn

from megatron_copd.config import load_config
from megatron_copd.runtime.distributed import launch_env


def train_command(config_path: str | None, overrides: list[str]) -> int:
    env = launch_env()
    world = None if env.launcher == "single" else env.world_size
    # Validate everything that can be checked before any process or group exists.
    cfg = load_config(config_path, overrides, world_size=world)
    if env.launcher == "single" and cfg.world_size > 1:
        from megatron_copd.runtime.launch import launch_local

        if cfg.data.world == "files":
            # Data files, tokenizer and its vision tokens: one line, before any worker starts.
            from megatron_copd.training.branch_data import check_files_world

            check_files_world(cfg)

        # The workers have all exited (reaped) when launch_local returns.
        return exit_now(
            launch_local(cfg.world_size, [sys.executable, "-m", "megatron_copd.cli", *sys.argv[1:]])
        )
    from megatron_copd.training.run import run_training

    return exit_now(run_training(cfg))


def eval_command(config_path: str | None, overrides: list[str], checkpoint: str) -> int:
    env = launch_env()
    world = None if env.launcher == "single" else env.world_size
    cfg = load_config(config_path, overrides, world_size=world)
    from megatron_copd.training.run import run_evaluation

    return run_evaluation(cfg, checkpoint)


def exit_now(code: int) -> NoReturn:
    """End a training rank whose work is complete and on disk (it returned 0 or EXIT_REQUEUE; an
    exception does not get here), or the local launcher once its workers are reaped, at once:
    the interpreter's teardown (freeing the torch / megatron objects and modules) takes seconds
    - measured 1.5-4 s per rank and ~1 s for the launcher on 2 busy CPU cores - which after a
    SIGTERM is taken from SLURM's grace period and delays the requeue."""
    import torch.distributed as dist

    if dist.is_initialized():
        # Every rank is past its last collective before any rank's sockets close.
        dist.barrier()
        dist.destroy_process_group()
    # The exit handlers still run (multiprocessing shuts down the helper processes it started,
    # e.g. megatron's checkpoint Manager; logging flushes); only the teardown is skipped.
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
