"""Everything a branch needs to continue training exactly, as one megatron sharded state dict.

=================  ==========================================================================
key                what, and how it is stored
=================  ==========================================================================
model              ``model.sharded_state_dict(prefix="model.")``: global tensors (any TP/PP)
optimizer          ``optimizer.sharded_state_dict(model_sd)``: per-parameter Adam moments keyed
                   by the parameter's key (``optimizer.state.exp_avg.model.<param>``), so they
                   reshard like the weights. The plain optimizer (CPU default) does this
                   natively; the distributed optimizer (GPU default) is asked for megatron's
                   ``fully_reshardable`` format, which stores the same model-space layout.
scheduler          the LR scheduler's state (common state, written once)
iteration          the completed step count (common state)
engine_state       the engine's own dict (sampler positions, CoPD schedule position, counters):
                   one pickled ShardedObject written by the branch's first rank; it must be the
                   branch-wide view (the same on every rank of the branch) and loads at any layout
rng_state          per-rank RNG states (python, numpy, torch CPU, CUDA when present, megatron's
                   model-parallel RNG tracker): a ShardedObject with one shard per rank of the
                   branch; restored only when the layout (TP/PP/DP/CP) is unchanged, because
                   per-rank streams have no meaning at another layout
=================  ==========================================================================
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel import random as mrandom

from megatron_copd.checkpoint.model_io import MODEL_PREFIX

log = logging.getLogger(__name__)

OPTIMIZER_PLAIN = "plain"
OPTIMIZER_DISTRIBUTED = "distributed/fully_reshardable"


def optimizer_format(branch_model) -> str:
    return OPTIMIZER_DISTRIBUTED if _uses_distributed_optimizer(branch_model) else OPTIMIZER_PLAIN


def _uses_distributed_optimizer(branch_model) -> bool:
    return bool(branch_model.ddp_model.ddp_config.use_distributed_optimizer)


def sharded_metadata(branch_model) -> dict:
    """The ``metadata`` megatron's model/optimizer ``sharded_state_dict`` take (as megatron's
    own training loop builds it), with this branch's groups."""
    md: dict[str, Any] = {
        "dp_cp_group": branch_model.groups.pgs.dp_cp,
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
    }
    if _uses_distributed_optimizer(branch_model):
        md["distrib_optim_sharding_type"] = "fully_reshardable"
        md["distrib_optim_fully_reshardable_mem_efficient"] = False
    return md


# ----------------------------------------------------------------------------------- RNG states
def capture_rng() -> dict:
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in mrandom.get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch_cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    mrandom.get_cuda_rng_tracker().set_states(
        {k: v.clone() for k, v in states["tracker"].items()}
    )


# ------------------------------------------------------------------------------ the state dict
def _rank_object(branch_model, data) -> ShardedObject:
    groups = branch_model.groups
    n = groups.layout.ranks_per_branch
    local = groups.layout.local_rank_in_branch(groups.rank)
    return ShardedObject("rng_state", data, (n,), (local,), replica_id=0)


def _branch_object(branch_model, key: str, data) -> ShardedObject:
    import torch.distributed as dist

    replica = dist.get_rank(branch_model.groups.branch_group)
    return ShardedObject(key, data, (1,), (0,), replica_id=replica)


def build_train_state(
    branch_model,
    iteration: int,
    engine_state: dict | None,
    *,
    for_loading: bool = False,
    with_rng: bool = True,
) -> dict:
    """This rank's part of the branch checkpoint (see the module docstring)."""
    md = sharded_metadata(branch_model)
    if for_loading:
        _materialize_distributed_optimizer_state(branch_model.optimizer)
    model_sd = branch_model.model.sharded_state_dict(prefix=MODEL_PREFIX, metadata=md)
    optim_sd = branch_model.optimizer.sharded_state_dict(
        model_sd, is_loading=for_loading, metadata=md
    )
    state: dict[str, Any] = {
        "model": model_sd,
        "optimizer": optim_sd,
        "scheduler": None if for_loading else branch_model.scheduler.state_dict(),
        "iteration": iteration,
        "engine_state": _branch_object(branch_model, "engine_state", engine_state),
    }
    if with_rng:
        state["rng_state"] = _rank_object(branch_model, None if for_loading else capture_rng())
    if for_loading:
        # Common entries come from the checkpoint; these placeholders are replaced.
        state.pop("scheduler")
        state.pop("iteration")
    return state


def _materialize_distributed_optimizer_state(optimizer) -> None:
    """A fresh DistributedOptimizer over torch's Adam (no Apex/TE: CPU) has no per-parameter
    state yet, and its ``state_dict()`` - which megatron calls while building the *loading*
    sharded state dict - asserts one common ``step``. Create zero moments and step 0 (all
    replaced by the load), as megatron's own ``init_state_fn`` does for the plain optimizer."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return  # fused optimizers keep the step in param_groups; megatron handles them
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, distrib_optimizer.DistributedOptimizer) or opt.is_stub_optimizer:
            continue
        inner = opt.optimizer
        params = [p for g in inner.param_groups for p in g["params"]]
        if all(len(inner.state[p]) for p in params):
            continue
        opt.init_state_fn(inner, opt.config)
        for p in params:
            inner.state[p].setdefault("step", torch.zeros((), dtype=torch.float32))


@contextlib.contextmanager
def _torch_adam_step_shim(optimizer):
    """Work around two megatron 0.19 DistributedOptimizer bugs with torch's Adam (no Apex/TE;
    fused optimizers keep the step in param_groups and are not affected):

    - the fully_reshardable / model-space loaders restore the per-parameter ``step`` tensor
      separately and leave it out of the tensors they copy, but
      ``_set_main_param_and_optimizer_states`` copies every tensor of the parameter's state and
      fails with KeyError 'step': feed the already-restored step back in during the load;
    - ``load_state_dict`` gives every parameter one *shared* step tensor, which torch's Adam
      then increments in place once per parameter per step (wrong bias correction after a
      resume): give each parameter its own copy afterwards.
    """
    from megatron.core.optimizer import distrib_optimizer

    patched = []
    if not distrib_optimizer.HAVE_APEX_OR_TE:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            if not isinstance(opt, distrib_optimizer.DistributedOptimizer):
                continue
            original = opt._set_main_param_and_optimizer_states

            def with_step(model_param, tensors, _opt=opt, _original=original):
                group_index, group_order = _opt.model_param_group_index_map[model_param]
                main = _opt.optimizer.param_groups[group_index]["params"][group_order]
                step = _opt.optimizer.state[main].get("step")
                if isinstance(step, torch.Tensor) and "step" not in tensors:
                    tensors = dict(tensors, step=step.clone())
                return _original(model_param, tensors)

            opt._set_main_param_and_optimizer_states = with_step
            patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
    for opt in patched:
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


@dataclass
class Restored:
    iteration: int
    engine_state: dict | None
    rng_restored: bool


def restore_train_state(branch_model, loaded: dict, *, with_rng: bool) -> Restored:
    """Put a loaded state (from :func:`build_train_state` ``for_loading=True``) into the model,
    optimizer, scheduler and RNGs."""
    weights = {
        k.removeprefix(MODEL_PREFIX): v
        for k, v in loaded["model"].items()
    }
    branch_model.model.load_state_dict(weights, strict=True)
    with _torch_adam_step_shim(branch_model.optimizer):
        branch_model.optimizer.load_state_dict(loaded["optimizer"])
    _restore_scheduler(branch_model.scheduler, loaded["scheduler"])
    if with_rng:
        restore_rng(loaded["rng_state"])
    return Restored(
        iteration=int(loaded["iteration"]),
        engine_state=loaded.get("engine_state"),
        rng_restored=with_rng,
    )


def _restore_scheduler(scheduler, saved: dict) -> None:
    """Step count from the checkpoint; hyper-parameters from the config (logged if they differ),
    so a user who edits e.g. ``optim.lr`` before resuming gets what the config says."""
    current = scheduler.state_dict()
    changed = [
        f"{k}: {saved[k]} -> {v}" for k, v in current.items()
        if k != "num_steps" and k in saved and saved[k] != v
    ]
    if changed:
        log.warning("LR schedule differs from the checkpoint; using the config: %s",
                    ", ".join(changed))
    scheduler.num_steps = 0
    scheduler.step(increment=int(saved["num_steps"]))
