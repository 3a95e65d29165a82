"""Loss callbacks for BranchModel.train_step (the last pipeline stage calls them).

Every training micro-batch is a [b, T] grid of right-padded rows (``training/samples.py``):
position t's logits predict ``labels[:, t]`` (= tokens[:, t + 1]); ``loss_mask[b, t]`` is 1 where
that target is a response token. Per-position inputs (old log-probs, advantages) use the same
grid.

Aggregation follows the paper, (1/N) sum_i (1/|y_i|) sum_t l_it: each callback returns the sum
over its sequences of the per-sequence token mean, and the number of (real) sequences; megatron
divides the gradients by the global count, so micro-batching and DP do not change the result.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_copd.algorithms.grpo import (
    clipped_surrogate,
    kl_to_reference,
    sequence_mean_loss,
)


def token_logprobs(output: torch.Tensor, targets: torch.Tensor, tp_group) -> torch.Tensor:
    """log p(targets) from vocab-parallel logits [b, T, V/tp] -> [b, T], differentiable.

    megatron's vocab-parallel cross entropy computes the log-sum-exp across TP ranks; it
    modifies its input in place, hence the copy made by transpose().contiguous().
    """
    logits = output.transpose(0, 1).contiguous().float()
    nll = vocab_parallel_cross_entropy(logits, targets.transpose(0, 1).contiguous(), tp_group=tp_group)
    return -nll.transpose(0, 1)


def _per_sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over sequences of each sequence's masked token mean; number of non-empty sequences.
    The division by the global count happens in megatron's gradient finalisation."""
    return sequence_mean_loss(values, mask, 1.0), (mask.sum(dim=1) > 0).sum()


def sft_loss(tp_group):
    """Supervised cross-entropy on response tokens (the toy base warm-up)."""

    def loss_fn(output: torch.Tensor, batch: dict):
        logp = token_logprobs(output, batch["labels"], tp_group)
        mask = batch["loss_mask"]
        total, count = _per_sequence_mean(-logp, mask)
        tokens = mask.sum()
        return total, count, {"loss": (total.item(), count.item()), "tokens": (tokens.item(), 1)}

    return loss_fn


def policy_loss(tp_group, eps_low: float, eps_high: float, kl_coef: float = 0.0):
    """GRPO clipped surrogate over every response token in the batch; OPD tokens carry their
    distillation advantage in ``advantages`` and use the same surrogate (``opd.share_clip``)."""

    def loss_fn(output: torch.Tensor, batch: dict):
        logp = token_logprobs(output, batch["labels"], tp_group)
        mask = batch["loss_mask"]
        per_token, stats = clipped_surrogate(
            logp, batch["old_logp"], batch["advantages"], mask, eps_low, eps_high
        )
        if kl_coef and "ref_logp" in batch:
            per_token = per_token + kl_coef * kl_to_reference(logp, batch["ref_logp"], mask)
        total, count = _per_sequence_mean(per_token, mask)
        n_tok = float(stats["tokens"])
        # (sum, count) pairs: reduce_metrics pools them over micro-batches exactly.
        metrics = {
            "loss": (total.item(), count.item()),
            "clip_frac_low": (float(stats["clipped_low"]), n_tok),
            "clip_frac_high": (float(stats["clipped_high"]), n_tok),
            "ratio_mean": (float(stats["ratio"]), n_tok),
            "approx_kl": (float(stats["approx_kl"]), n_tok),
        }
        return total, count, metrics

    return loss_fn
