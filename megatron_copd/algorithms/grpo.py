"""GRPO: group-normalised advantages, the clip-higher token-level surrogate, and its aggregation.

Pure tensor functions (no process groups). Shapes: ``b`` sequences, ``t`` token positions of the
response, ``mask`` True on response tokens that count (False on prompt and padding).

Aggregation matches the paper's loss (1/G) sum_i (1/|y_i|) sum_t l_{i,t}: every sequence is
averaged over its own valid tokens, then summed and divided by the number of sequences of the
WHOLE optimizer step, passed in explicitly. Because nothing depends on how the step's sequences
are split, summing :func:`sequence_mean_loss` over micro-batches gives exactly the full-batch
loss and gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "group_advantages",
    "zero_variance_groups",
    "clipped_surrogate",
    "kl_to_reference",
    "sequence_mean_loss",
    "token_mean_loss",
    "mean_stats",
    "LOG_RATIO_CLAMP",
]

LOG_RATIO_CLAMP = 20.0
"""|log ratio| is clamped here before exp: keeps exp finite (no inf * 0 = NaN in the backward of
the unselected min branch). At e^20 the ratio is far outside any clip range, so clipped tokens are
unaffected; an unclipped token (A < 0, ratio > e^20) loses its gradient, which only happens for a
policy that has diverged anyway."""


def _groups(x: Tensor, group_size: int) -> Tensor:
    if x.dim() != 1:
        raise ValueError(f"rewards: expected a 1-D tensor, got shape {tuple(x.shape)}")
    if group_size < 1 or x.numel() % group_size:
        raise ValueError(
            f"rewards: {x.numel()} values do not split into groups of {group_size} "
            "(rollouts of one prompt must be contiguous)"
        )
    return x.view(-1, group_size)


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """(r - mean_g) / (std_g + eps) per group of ``group_size`` contiguous rollouts.

    std is the POPULATION std (divide by G, ``unbiased=False``): for 0/1 rewards with success
    rate p it is sqrt(p (1 - p)), it is defined for G = 1, and it does not depend on a Bessel
    factor. (TRL and verl use the sample std, which is sqrt(G / (G - 1)) times larger, i.e. their
    advantages are smaller by that constant for a fixed G.) Groups with equal rewards get 0.
    """
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    g = _groups(rewards.to(torch.float64), group_size)
    mean = g.mean(dim=1, keepdim=True)
    std = g.std(dim=1, unbiased=False, keepdim=True)
    return ((g - mean) / (std + eps)).reshape(-1).to(out_dtype)


def zero_variance_groups(rewards: Tensor, group_size: int, atol: float = 0.0) -> Tensor:
    """BoolTensor[n_groups]: True where every reward of the group is equal (within ``atol``).

    Such groups have zero advantage everywhere and carry no GRPO signal."""
    g = _groups(rewards, group_size)
    return (g.max(dim=1).values - g.min(dim=1).values) <= atol


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)``, 0 off-mask.

    ``ratio = exp(logp - old_logp)`` against the rollout policy's log-probs (``old_logp``, no
    gradient). ``advantages``: ``[b]`` (one per sequence, GRPO) or ``[b, t]`` (per token, OPD).
    The asymmetric range ("clip-higher") lets a positive-advantage token's probability grow up
    to 1 + eps_high before the gradient stops, while a negative-advantage token stops at
    1 - eps_low.

    Returns ``(loss[b, t], stats)`` where ``stats`` holds detached SUMS over valid tokens
    (``tokens``, ``clipped_low``, ``clipped_high``, ``ratio``, ``approx_kl``) so micro-batches
    and ranks can be added up exactly; :func:`mean_stats` turns them into means.
    ``clipped_low`` counts tokens where the lower bound binds (A < 0, ratio < 1 - eps_low);
    ``clipped_high`` where the upper bound binds (A > 0, ratio > 1 + eps_high); ``approx_kl`` is
    the k3 estimate of KL(old || new): ratio - 1 - log ratio.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"clipped_surrogate: logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and "
            f"mask {tuple(mask.shape)} must have the same shape"
        )
    mask = mask.bool()
    adv = advantages.to(logp.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    adv = adv.detach()
    # Off-mask positions may hold anything (padding, -inf): they must not reach exp().
    log_ratio = torch.where(mask, logp - old_logp.detach(), torch.zeros_like(logp))
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    loss = torch.where(mask, loss, torch.zeros_like(loss))

    with torch.no_grad():
        m = mask.to(logp.dtype)
        r = ratio.detach()
        adv_b = adv.expand_as(r)
        stats = {
            "tokens": m.sum(),
            "clipped_low": ((adv_b < 0) & (r < 1.0 - eps_low) & mask).to(logp.dtype).sum(),
            "clipped_high": ((adv_b > 0) & (r > 1.0 + eps_high) & mask).to(logp.dtype).sum(),
            "ratio": (r * m).sum(),
            "approx_kl": ((r - 1.0 - log_ratio.detach()) * m).sum(),
        }
    return loss, stats


def mean_stats(stats: dict[str, Tensor]) -> dict[str, float]:
    """Means from summed stats: clip_frac_low, clip_frac_high, ratio_mean, approx_kl."""
    n = max(float(stats["tokens"]), 1.0)
    return {
        "clip_frac_low": float(stats["clipped_low"]) / n,
        "clip_frac_high": float(stats["clipped_high"]) / n,
        "ratio_mean": float(stats["ratio"]) / n if float(stats["tokens"]) else 1.0,
        "approx_kl": float(stats["approx_kl"]) / n,
    }


def kl_to_reference(logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) on tokens sampled from pi:
    ``exp(ref - logp) - (ref - logp) - 1`` (>= 0, unbiased; gradient flows through ``logp``)."""
    d = ref_logp.detach() - logp
    if mask is not None:
        d = torch.where(mask.bool(), d, torch.zeros_like(d))
    d = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    kl = torch.exp(d) - d - 1.0
    return kl if mask is None else torch.where(mask.bool(), kl, torch.zeros_like(kl))


def sequence_mean_loss(token_loss: Tensor, mask: Tensor, num_sequences: int | float) -> Tensor:
    """sum_i (1/|y_i|) sum_t loss[i, t] / num_sequences — the paper's GRPO aggregation.

    ``num_sequences`` is the number of sequences in the whole optimizer step (all micro-batches),
    not in ``token_loss``; then the sum over micro-batches equals the full-batch loss exactly.
    With data parallelism whose gradient reduction AVERAGES over ranks (megatron DDP default),
    pass the per-rank share (global count / DP size) so the averaged gradient is the global one;
    with a summing reduction, pass the global count. Sequences without valid tokens add 0.
    Note megatron's forward_step_calc_loss rescales a loss function's output (by 1 /
    num_microbatches, and more); a caller going through it must compensate.
    """
    m = mask.to(token_loss.dtype)
    lengths = m.sum(dim=-1).clamp(min=1.0)
    per_seq = (token_loss * m).sum(dim=-1) / lengths
    return per_seq.sum() / float(num_sequences)


def token_mean_loss(token_loss: Tensor, mask: Tensor, num_tokens: int | float) -> Tensor:
    """sum of valid token losses / num_tokens (DAPO-style token-level mean); ``num_tokens`` is
    the number of valid tokens of the whole step, for the same micro-batch exactness."""
    return (token_loss * mask.to(token_loss.dtype)).sum() / float(num_tokens)
