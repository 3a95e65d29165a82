"""`copd train` / `copd eval`: validate the config, then either start the local worker processes
(run plainly) or run this process's rank (under torchrun / srun / the local launcher)."""

from __future__ import annotations

import sys

from megatron_copd.config import load_config
from megatron_copd.runtime.distributed import launch_env


def train_command(config_path: str | None, overrides: list[str]) -> int:
    env = launch_env()
    world = None if env.launcher == "single" else env.world_size
    # Validate everything that can be checked before any process or group exists.
    cfg = load_config(config_path, overrides, world_size=world)
    if env.launcher == "single" and cfg.world_size > 1:
        from megatron_copd.runtime.launch import launch_local

        return launch_local(cfg.world_size, [sys.executable, "-m", "megatron_copd.cli", *sys.argv[1:]])
    from megatron_copd.training.run import run_training

    return run_training(cfg)


def eval_command(config_path: str | None, overrides: list[str], checkpoint: str) -> int:
    env = launch_env()
    world = None if env.launcher == "single" else env.world_size
    cfg = load_config(config_path, overrides, world_size=world)
    from megatron_copd.training.run import run_evaluation

    return run_evaluation(cfg, checkpoint)
