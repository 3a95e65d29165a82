"""Behavioural similarity between a student and a teacher on the student's own rollouts.

- Top-k overlap (the CoPD paper's O_k, k = 10): at each prefix of a student rollout,
  |Top_k(student) ∩ Top_k(teacher)| / k, averaged over valid positions.
- Symmetric KL estimated from the log-probs of the SAMPLED tokens only. With
  r = pi_T(y_t) / pi_S(y_t) and y_t ~ pi_S:  KL(S || T) = E_S[-log r],  KL(T || S) = E_S[r log r],
  their sum E_S[(r - 1) log r] (>= 0 per token). These are Monte-Carlo estimates from the
  student's own samples — unbiased for the per-token conditional KLs at the visited prefixes,
  noisy for few tokens, and the two one-sided parts can be negative on a small sample.

Both return means and have ``*_sums`` forms (sums + counts) so that micro-batches and ranks can
be combined exactly before dividing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "topk_overlap_counts",
    "topk_overlap",
    "topk_overlap_per_sequence",
    "KLEstimate",
    "symmetric_kl_sums",
    "symmetric_kl_estimate",
]


def topk_overlap_counts(student_topk: Tensor, teacher_topk: Tensor) -> Tensor:
    """|intersection| per position, ``[b, t]`` (ids within one top-k list are distinct).

    Sort-and-search, O(b t k log k) memory-light, rather than a [b, t, k, k] comparison."""
    if student_topk.shape != teacher_topk.shape:
        raise ValueError(
            f"topk_overlap: student {tuple(student_topk.shape)} and teacher "
            f"{tuple(teacher_topk.shape)} top-k ids must have the same shape [b, t, k]"
        )
    k = student_topk.shape[-1]
    t_sorted = teacher_topk.sort(dim=-1).values.contiguous()
    pos = torch.searchsorted(t_sorted, student_topk.contiguous()).clamp(max=k - 1)
    hit = t_sorted.gather(-1, pos) == student_topk
    return hit.sum(dim=-1)


def topk_overlap(student_topk: Tensor, teacher_topk: Tensor, mask: Tensor) -> Tensor:
    """Mean over valid positions of |Top_k(S) ∩ Top_k(T)| / k (NaN when no position is valid)."""
    k = student_topk.shape[-1]
    m = mask.bool()
    c = topk_overlap_counts(student_topk, teacher_topk).to(torch.float64)
    return ((c * m).sum() / (m.sum() * k)).float()


def topk_overlap_per_sequence(student_topk: Tensor, teacher_topk: Tensor, mask: Tensor) -> Tensor:
    """``[b]``: each sequence's mean overlap over its valid positions (NaN for none)."""
    k = student_topk.shape[-1]
    m = mask.bool()
    c = topk_overlap_counts(student_topk, teacher_topk).to(torch.float64)
    return ((c * m).sum(dim=-1) / (m.sum(dim=-1) * k)).float()


@dataclass
class KLEstimate:
    """Per-token means (nats) of the sampled-token estimators; 0-dim tensors."""

    kl_student_teacher: Tensor
    """KL(pi_S || pi_T) ~ E_S[-log r]."""
    kl_teacher_student: Tensor
    """KL(pi_T || pi_S) ~ E_S[r log r]."""
    symmetric: Tensor
    """Sum of the two ~ E_S[(r - 1) log r]."""


def symmetric_kl_sums(
    student_logp: Tensor, teacher_logp: Tensor, mask: Tensor
) -> dict[str, Tensor]:
    """Sums over valid tokens (float64): ``tokens``, ``kl_st``, ``kl_ts``, ``sym``."""
    m = mask.bool()
    log_r = torch.where(m, teacher_logp.detach().double() - student_logp.detach().double(), 0.0)
    # float64 keeps exp(log r) finite up to log r ~ 709 (a token the teacher finds e^709 times
    # likelier than the student is not a realistic sample).
    r = torch.exp(log_r)
    md = m.double()
    return {
        "tokens": md.sum(),
        "kl_st": (-log_r * md).sum(),
        "kl_ts": (r * log_r * md).sum(),
        "sym": ((r - 1.0) * log_r * md).sum(),
    }


def symmetric_kl_estimate(student_logp: Tensor, teacher_logp: Tensor, mask: Tensor) -> KLEstimate:
    """Per-token mean KL estimates on the student's samples (see the module docstring)."""
    s = symmetric_kl_sums(student_logp, teacher_logp, mask)
    n = s["tokens"]
    return KLEstimate(
        kl_student_teacher=(s["kl_st"] / n).float(),
        kl_teacher_student=(s["kl_ts"] / n).float(),
        symmetric=(s["sym"] / n).float(),
    )
