"""The little process-global state megatron still needs when parallel_state is not initialised:
the memory buffer used by local attention, and the RNG tracker seeded with explicit ranks."""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as mrandom

from megatron_copd.runtime import fp8_groups
from megatron_copd.runtime.branches import BranchGroups


def init_megatron_state(groups: BranchGroups, seed: int) -> None:
    """Call once per process after the branch groups exist."""
    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()
    # FP8 amax reductions over this branch's TP x DP group, never the whole world.
    fp8_groups.install(groups.pgs)
    seed_everything(seed, groups.tp_rank)


def seed_everything(seed: int, tp_rank: int = 0) -> None:
    """Same seed on every rank of a branch (identical weights at init and identical sampling on
    TP peers); megatron's TP tracker gets the per-TP-rank offset."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    mrandom.model_parallel_cuda_manual_seed(
        seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0, force_reset_rng=True
    )
