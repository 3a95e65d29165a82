"""The gradient-conflict meter: how the policy gradients of different sample groups (a mixed
branch's domains; a student's own RL samples and its distillation samples) align.

For each group the loss over that group's micro-batches alone is back-propagated through the
branch's model (megatron's schedule, so TP / PP / DP and the loss normalisation are the
training step's); its gradient is read from the DDP buffers (after megatron's gradient
finalisation, so already reduced over DP). Dot products are taken over the full parameter
vector: every parameter once (TP-replicated parameters on TP rank 0 only, a tied embedding once
across the pipeline: megatron's own rule for the gradient norm), summed over the
model-parallel (TP x PP) group. Returns each group's gradient norm and the cosine between every
pair. It leaves the gradient buffers zeroed: call it before (or instead of) a training step.

Cost: one forward and backward per group over its samples, and one copy of the gradient per
group; the training step does not reuse them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared


def counted_params(model, tp_group) -> list[torch.nn.Parameter]:
    """The parameters whose gradients make up this rank's part of the full vector."""
    return [p for p in model.parameters()
            if p.requires_grad and param_is_not_shared(p)
            and param_is_not_tensor_parallel_duplicate(p, tp_group=tp_group)]


def gradient_conflict(branch, groups: Mapping[str, Sequence[dict]], loss_fn,
                      seq_length: int | Mapping[str, int]) -> dict[str, float]:
    """``groups``: name -> that group's micro-batches (``build_micro_batches``); ``seq_length``
    one width or one per group. -> ``{"grad_norm/NAME": ..., "grad_cos/A/B": ...}`` (the same
    on every rank of the branch)."""
    pgs = branch.groups.pgs
    if branch.ddp_model.ddp_config.use_distributed_optimizer and pgs.dp.size() > 1:
        from megatron_copd.errors import UserError

        raise UserError("parallel.distributed_optimizer: the gradient-conflict meter reads "
                        "whole gradients, which the distributed optimizer reduce-scatters "
                        "over DP; turn it off for a metered run")
    params = counted_params(branch.model, pgs.tp)
    names = [n for n, batches in groups.items() if batches]
    grads: list[list[torch.Tensor]] = []
    branch.ddp_model.train()
    for name in names:
        branch.ddp_model.zero_grad_buffer()
        width = seq_length[name] if isinstance(seq_length, Mapping) else seq_length
        branch.forward_backward(list(groups[name]), loss_fn, width)
        grads.append([_grad(p).detach().float().clone() for p in params])
    branch.ddp_model.zero_grad_buffer()
    k = len(names)
    dots = torch.zeros(k, k, dtype=torch.float64, device=_device(params))
    for i, j in itertools.combinations_with_replacement(range(k), 2):
        d = sum((a.double() * b.double()).sum() for a, b in zip(grads[i], grads[j]))
        dots[i, j] = dots[j, i] = d
    if dist.is_initialized() and pgs.mp.size() > 1:
        dist.all_reduce(dots, group=pgs.mp)
    out: dict[str, float] = {}
    norms = [math.sqrt(max(float(dots[i, i]), 0.0)) for i in range(k)]
    for i, name in enumerate(names):
        out[f"grad_norm/{name}"] = norms[i]
    for i, j in itertools.combinations(range(k), 2):
        denom = norms[i] * norms[j]
        out[f"grad_cos/{names[i]}/{names[j]}"] = float(dots[i, j]) / denom if denom else 0.0
    return out


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    g = getattr(p, "main_grad", None)
    if g is None:
        g = p.grad if p.grad is not None else torch.zeros_like(p)
    return g


def _device(params) -> torch.device:
    return params[0].device if params else torch.device("cpu")
