"""Log-probs, entropy and top-k from vocab-parallel logits, without gathering the vocabulary.

Each tensor-parallel rank holds the logits of one contiguous vocabulary shard,
``[..., V / tp]`` for ids ``[rank * V / tp, (rank + 1) * V / tp)`` (megatron's
``ColumnParallelLinear`` output layer with ``parallel_output=True``). The reductions are:

* log-sum-exp: MAX all-reduce of the shard maxima (a constant shift, no gradient), then a SUM
  all-reduce of the shifted exponentials;
* logit at a global id: the owning shard picks it (range mask), SUM all-reduce;
* top-k: local top-k, all-gather of the ``k`` candidates of every shard, top-k again.

The SUM all-reduces are megatron's ``reduce_from_tensor_model_parallel_region`` (forward:
all-reduce, backward: identity). That is the exact gradient as long as every value computed
after a reduction is replicated (the loss is the same on every TP rank) — never feed a reduced
value back into per-shard terms. So :func:`token_logprobs` and :func:`entropy` are
differentiable and give each rank the exact gradient of its own shard — the training loss uses
them directly. ``tp_group=None`` (or a group of size 1) means the logits are the full vocabulary.

All math runs in float32 whatever the logits' dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def _tp(tp_group: dist.ProcessGroup | None) -> tuple[int, int]:
    if tp_group is None:
        return 1, 0
    return tp_group.size(), tp_group.rank()


def _sum(x: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    if _tp(tp_group)[0] == 1:
        return x
    return reduce_from_tensor_model_parallel_region(x, group=tp_group)


def _shift(x: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Global max over the vocabulary: a constant shift for stable exponentials (no gradient)."""
    shift = x.detach().amax(dim=-1)
    if _tp(tp_group)[0] > 1:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=tp_group)
    return shift


def logsumexp(logits: torch.Tensor, tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``[..., V/tp]`` -> ``[...]``: log-sum-exp over the whole vocabulary (differentiable)."""
    x = logits.float()
    shift = _shift(x, tp_group)
    sum_exp = _sum(torch.exp(x - shift.unsqueeze(-1)).sum(dim=-1), tp_group)
    return shift + torch.log(sum_exp)


def target_logits(
    logits: torch.Tensor, targets: torch.Tensor, tp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """``[..., V/tp]`` logits and ``[...]`` global ids -> ``[...]`` logit of each id."""
    size, rank = _tp(tp_group)
    shard = logits.shape[-1]
    local = targets - rank * shard
    in_shard = (local >= 0) & (local < shard)
    picked = logits.float().gather(-1, local.clamp(0, shard - 1).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(in_shard, picked, torch.zeros_like(picked))
    return _sum(picked, tp_group) if size > 1 else picked


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, tp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """``log softmax(logits)[target]`` over the full vocabulary, ``[...]`` float32.

    Differentiable: at TP > 1 each rank gets the gradient for its vocabulary shard.
    """
    return target_logits(logits, targets, tp_group) - logsumexp(logits, tp_group)


def entropy(logits: torch.Tensor, tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the full vocabulary, ``[...]`` (differentiable).

    ``H = log S0 - S1 / S0`` with ``S0 = sum exp(x - c)``, ``S1 = sum exp(x - c) x`` (``c`` the
    shift). Only the two vocabulary sums cross the TP group, and everything after them is
    replicated, so the identity backward of the sums is exact. (Writing it as
    ``lse - sum(p * x)`` with a shared ``lse`` inside the per-shard terms would drop the other
    shards' share of the gradient through ``lse``.)
    """
    x = logits.float()
    shift = _shift(x, tp_group).unsqueeze(-1)
    e = torch.exp(x - shift)
    s0 = _sum(e.sum(dim=-1), tp_group)
    s1 = _sum((e * (x - shift)).sum(dim=-1), tp_group)
    return torch.log(s0) - s1 / s0


@torch.no_grad()
def topk(
    logits: torch.Tensor,
    k: int,
    tp_group: dist.ProcessGroup | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k of ``[..., V/tp]`` logits -> (ids ``[..., k]`` int64, log-probs ``[..., k]``).

    Ids are global vocabulary ids, sorted by decreasing probability.
    """
    size, rank = _tp(tp_group)
    x = logits.float()
    shard = x.shape[-1]
    if k > shard * size:
        raise ValueError(f"top-k: k={k} exceeds the vocabulary size {shard * size}")
    lse = logsumexp(x, tp_group) if lse is None else lse
    kk = min(k, shard)
    vals, ids = x.topk(kk, dim=-1)
    ids = ids + rank * shard
    if size > 1:
        all_vals = [torch.empty_like(vals) for _ in range(size)]
        all_ids = [torch.empty_like(ids) for _ in range(size)]
        dist.all_gather(all_vals, vals.contiguous(), group=tp_group)
        dist.all_gather(all_ids, ids.contiguous(), group=tp_group)
        vals = torch.cat(all_vals, dim=-1)
        ids = torch.cat(all_ids, dim=-1)
        vals, pick = vals.topk(k, dim=-1)
        ids = ids.gather(-1, pick)
    return ids, vals - lse.unsqueeze(-1)
