"""On-policy distillation advantages (CoPD phase II, MOPD) and truncated importance weights.

All outputs are detached: the teacher's log-probs are a reward signal, not something to
differentiate through, and the advantage enters the same clipped surrogate as GRPO's.
Shapes: ``[b, t]`` per-token log-probs of the tokens the STUDENT sampled; ``mask`` True on
response tokens that count.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["opd_advantages", "mopd_advantages", "truncated_importance_weights"]


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def _per_seq(x: float | Tensor, like: Tensor) -> float | Tensor:
    """A scalar, or a [b] tensor broadcast over tokens."""
    if isinstance(x, Tensor) and x.dim() == 1:
        return x.to(like.dtype).unsqueeze(-1)
    return x


def opd_advantages(
    teacher_logp: Tensor, student_logp: Tensor, beta: float | Tensor, mask: Tensor
) -> Tensor:
    """A_t = beta * sg[log pi_T(y_t) - log pi_S(y_t)], 0 off-mask.

    Positive where the teacher likes the student's token more than the student does (push it
    up), negative where less. ``beta``: a float or a ``[b]`` tensor (per-sequence scale).
    """
    delta = teacher_logp.detach() - student_logp.detach()
    return _masked(_per_seq(beta, delta) * delta, mask)


def mopd_advantages(
    teacher_logp: Tensor,
    student_logp: Tensor,
    orm_advantages_per_seq: Tensor,
    alpha: float,
    mask: Tensor,
) -> Tensor:
    """MiMo-style multi-teacher OPD: A_t = sg[log pi_T - log pi_S] + alpha * A_ORM(seq).

    ``teacher_logp`` holds, for each sequence, the log-probs from ITS domain's teacher (route
    before calling); ``orm_advantages_per_seq`` ``[b]`` is the outcome-reward advantage (e.g.
    :func:`~megatron_copd.algorithms.grpo.group_advantages`), broadcast over the tokens.
    """
    delta = teacher_logp.detach() - student_logp.detach()
    orm = orm_advantages_per_seq.detach().to(delta.dtype).unsqueeze(-1)
    return _masked(delta + alpha * orm, mask)


def truncated_importance_weights(
    logp_train: Tensor, logp_rollout: Tensor, cap: float, mask: Tensor | None = None
) -> Tensor:
    """w_t = min(pi_train(y_t) / pi_rollout(y_t), cap), detached (truncated importance sampling).

    Corrects for a rollout engine whose numerics differ from the trainer's; multiply the
    per-token loss by it. 0 off-mask when a mask is given.
    """
    if cap <= 0:
        raise ValueError(f"truncated_importance_weights: cap must be > 0, got {cap}")
    d = logp_train.detach() - logp_rollout.detach()
    if mask is not None:
        d = _masked(d, mask)  # off-mask values may be -inf - -inf = NaN
    w = torch.exp(d.clamp(max=math.log(cap)))
    return w if mask is None else _masked(w, mask)
