"""OPD / MOPD advantages, truncated importance weights, top-k overlap and symmetric KL."""

import math

import pytest
import torch

from megatron_copd.algorithms.opd import (
    mopd_advantages,
    opd_advantages,
    truncated_importance_weights,
)
from megatron_copd.algorithms.overlap import (
    symmetric_kl_estimate,
    symmetric_kl_sums,
    topk_overlap,
    topk_overlap_counts,
    topk_overlap_per_sequence,
)


def test_opd_advantages_hand_computed_and_detached():
    teacher = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, 0.0]])
    student = torch.tensor([[-1.5, -1.0, -3.0], [-1.5, -2.0, float("-inf")]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    a = opd_advantages(teacher, student, beta=2.0, mask=mask)
    # beta * (teacher - student): [0.5, -1, 0] * 2 ; [1, -2, masked]
    torch.testing.assert_close(a, torch.tensor([[1.0, -2.0, 0.0], [2.0, -4.0, 0.0]]))
    assert not a.requires_grad  # stop-gradient: the teacher signal is a reward
    per_seq = opd_advantages(teacher, student, beta=torch.tensor([1.0, 0.5]), mask=mask)
    torch.testing.assert_close(per_seq, torch.tensor([[0.5, -1.0, 0.0], [0.5, -1.0, 0.0]]))


def test_mopd_advantages_add_the_orm_term_per_sequence():
    teacher = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    student = torch.tensor([[-1.5, -1.0], [-2.0, -1.0]])
    orm = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[True, False], [True, True]])
    a = mopd_advantages(teacher, student, orm, alpha=0.5, mask=mask)
    # delta + 0.5 * orm: [0.5 + 0.5, masked] ; [1 - 1, 0 - 1]
    torch.testing.assert_close(a, torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    # alpha = 0 is plain OPD with beta = 1
    plain = opd_advantages(teacher, student, 1.0, mask)
    torch.testing.assert_close(mopd_advantages(teacher, student, orm, 0.0, mask), plain)


def test_truncated_importance_weights():
    train = torch.tensor([[-1.0, -1.0, -1.0, 0.0]], requires_grad=True)
    rollout = torch.tensor([[-1.0, -2.0, -0.5, float("-inf")]])
    w = truncated_importance_weights(train, rollout, cap=2.0)
    torch.testing.assert_close(
        w[:, :3], torch.tensor([[1.0, 2.0, math.exp(-0.5)]])  # e^1 = 2.718 is capped at 2
    )
    assert not w.requires_grad
    mask = torch.tensor([[True, True, True, False]])
    wm = truncated_importance_weights(train, rollout, cap=2.0, mask=mask)
    assert wm[0, 3] == 0 and torch.isfinite(wm).all()
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_importance_weights(train, rollout, cap=0.0)


def test_topk_overlap_hand_computed():
    s = torch.tensor([[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [1, 2, 3]]])
    t = torch.tensor([[[3, 2, 9], [7, 8, 9]], [[9, 8, 7], [3, 4, 5]]])
    assert topk_overlap_counts(s, t).tolist() == [[2, 0], [3, 1]]
    mask = torch.tensor([[True, True], [True, False]])
    # valid positions: 2/3, 0, 3/3 -> mean 5/9
    assert topk_overlap(s, t, mask).item() == pytest.approx(5 / 9)
    per = topk_overlap_per_sequence(s, t, mask)
    torch.testing.assert_close(per, torch.tensor([1 / 3, 1.0]))
    none = topk_overlap_per_sequence(s, t, torch.tensor([[True, True], [False, False]]))
    assert math.isnan(none[1].item())
    with pytest.raises(ValueError, match="same shape"):
        topk_overlap(s, t[..., :2], mask)


def test_topk_overlap_matches_brute_force_k10():
    g = torch.Generator().manual_seed(0)
    b, t, k, vocab = 3, 7, 10, 30
    s = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(b * t)]).view(b, t, k)
    # teachers partly agree: keep a random number of the student's ids, fill the rest
    rows = []
    for row in s.view(-1, k):
        keep = int(torch.randint(0, k + 1, (1,), generator=g))
        rest = [v for v in torch.randperm(vocab, generator=g).tolist() if v not in row[:keep]]
        ids = torch.tensor(row[:keep].tolist() + rest[: k - keep])
        rows.append(ids[torch.randperm(k, generator=g)])
    tt = torch.stack(rows).view(b, t, k)
    brute = (s.unsqueeze(-1) == tt.unsqueeze(-2)).any(-1).sum(-1)
    assert torch.equal(topk_overlap_counts(s, tt), brute)
    mask = torch.rand(b, t, generator=g) > 0.3
    expected = (brute.double() * mask).sum() / (mask.sum() * k)
    assert topk_overlap(s, tt, mask).item() == pytest.approx(expected.item(), abs=1e-6)
    assert topk_overlap(s, s, mask).item() == 1.0


def test_symmetric_kl_hand_computed():
    student = torch.tensor([[math.log(0.5), math.log(0.25), 0.0]])
    teacher = torch.tensor([[math.log(0.25), math.log(0.5), float("-inf")]])
    mask = torch.tensor([[True, True, False]])
    est = symmetric_kl_estimate(student, teacher, mask)
    ln2 = math.log(2)
    # r = [1/2, 2]: E[-log r] = 0 ; E[r log r] = (-ln2/2 + 2 ln2)/2 ; E[(r-1) log r] the same
    assert est.kl_student_teacher.item() == pytest.approx(0.0, abs=1e-7)
    assert est.kl_teacher_student.item() == pytest.approx(0.75 * ln2, rel=1e-6)
    assert est.symmetric.item() == pytest.approx(0.75 * ln2, rel=1e-6)
    sums = symmetric_kl_sums(student, teacher, mask)
    assert sums["tokens"].item() == 2
    # per token (r - 1) log r >= 0 even where the one-sided parts are negative
    assert sums["sym"].item() >= 0 and math.isfinite(sums["sym"].item())


def test_symmetric_kl_estimate_converges_to_the_exact_kl():
    """On the student's own samples the estimators approach the exact per-token KLs."""
    g = torch.Generator().manual_seed(1)
    p_s = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    p_t = torch.tensor([0.3, 0.3, 0.2, 0.2], dtype=torch.float64)
    y = torch.multinomial(p_s, 200_000, replacement=True, generator=g).view(1, -1)
    est = symmetric_kl_estimate(p_s.log()[y], p_t.log()[y], torch.ones_like(y, dtype=torch.bool))
    kl_st = (p_s * (p_s / p_t).log()).sum().item()
    kl_ts = (p_t * (p_t / p_s).log()).sum().item()
    assert est.kl_student_teacher.item() == pytest.approx(kl_st, abs=0.01)
    assert est.kl_teacher_student.item() == pytest.approx(kl_ts, abs=0.02)
    assert est.symmetric.item() == pytest.approx(kl_st + kl_ts, abs=0.02)
