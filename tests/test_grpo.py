"""GRPO math against hand-computed values: advantages, clip-higher, k3 KL, aggregation."""

import math

import pytest
import torch

from megatron_copd.algorithms.grpo import (
    clipped_surrogate,
    group_advantages,
    kl_to_reference,
    mean_stats,
    sequence_mean_loss,
    token_mean_loss,
    zero_variance_groups,
)


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1])
    a = group_advantages(r, group_size=4, eps=1e-12)
    s3 = math.sqrt(3.0)
    # group 1: mean 1/4, population std sqrt(3)/4 -> (3/4)/(sqrt(3)/4) = sqrt(3), -1/sqrt(3)
    expected = [s3, -1 / s3, -1 / s3, -1 / s3, 1, 1, -1, -1, 0, 0, 0, 0]
    torch.testing.assert_close(a, torch.tensor(expected), atol=1e-6, rtol=0)
    # non-binary rewards, G = 3: mean 0.5, population std sqrt(1/6)
    a3 = group_advantages(torch.tensor([0.5, 1.0, 0.0]), group_size=3, eps=0.0)
    k = 0.5 / math.sqrt(1 / 6)
    torch.testing.assert_close(a3, torch.tensor([0.0, k, -k]), atol=1e-6, rtol=0)


def test_group_advantages_eps_and_zero_variance_and_dtype():
    a = group_advantages(torch.tensor([1.0, 0.0]), group_size=2, eps=0.5)
    torch.testing.assert_close(a, torch.tensor([0.5 / 1.0, -0.5 / 1.0]))  # std 0.5 + eps 0.5
    a = group_advantages(torch.tensor([3, 3, 3], dtype=torch.int64), group_size=3)
    assert a.dtype == torch.float32 and torch.equal(a, torch.zeros(3))
    assert torch.equal(group_advantages(torch.tensor([0.7]), group_size=1), torch.zeros(1))
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), group_size=2)


def test_zero_variance_groups():
    r = torch.tensor([1.0, 1, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5000001])
    assert zero_variance_groups(r, 4).tolist() == [False, True, True, False]
    assert zero_variance_groups(r, 4, atol=1e-3).tolist() == [False, True, True, True]


def _tokens(ratios, advantages, old=-1.0):
    ratios = torch.tensor(ratios, dtype=torch.float64)
    old_logp = torch.full_like(ratios, old)
    logp = (old_logp + ratios.log()).requires_grad_(True)
    return logp, old_logp, torch.tensor(advantages, dtype=torch.float64)


def test_clip_higher_asymmetry_hand_computed():
    # one sequence per token: [b=6, t=1], per-sequence advantages
    ratios = [1.25, 1.3, 0.75, 0.85, 0.7, 1.5]
    advs = [1.0, 1.0, -1.0, -1.0, 1.0, -1.0]
    logp, old, adv = _tokens([[r] for r in ratios], advs)
    mask = torch.ones(6, 1, dtype=torch.bool)
    loss, stats = clipped_surrogate(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    expected = [
        -1.25,  # A>0, 1.25 < 1.28: NOT clipped
        -1.28,  # A>0, 1.3 > 1.28: clipped at 1 + eps_high
        0.80,  # A<0, 0.75 < 0.8: clipped at 1 - eps_low
        0.85,  # A<0, inside the range
        -0.70,  # A>0 below 1 - eps_low: the min keeps the unclipped term
        1.50,  # A<0 above 1 + eps_high: the min keeps the unclipped term
    ]
    torch.testing.assert_close(loss[:, 0], torch.tensor(expected, dtype=torch.float64))
    loss.sum().backward()
    # d(-ratio * A)/d logp = -ratio * A where unclipped, 0 where the clip binds
    grad = [-1.25, 0.0, 0.0, 0.85, -0.7, 1.5]
    torch.testing.assert_close(logp.grad[:, 0], torch.tensor(grad, dtype=torch.float64))
    assert stats["clipped_high"].item() == 1 and stats["clipped_low"].item() == 1
    assert stats["tokens"].item() == 6
    m = mean_stats(stats)
    assert m["clip_frac_high"] == pytest.approx(1 / 6)
    assert m["clip_frac_low"] == pytest.approx(1 / 6)
    assert m["ratio_mean"] == pytest.approx(sum(ratios) / 6)
    k3 = sum(r - 1 - math.log(r) for r in ratios) / 6
    assert m["approx_kl"] == pytest.approx(k3)

    # The same 1.25 token under a symmetric 0.2 range IS clipped: the asymmetry matters.
    logp, old, adv = _tokens([[1.25]], [1.0])
    loss, _ = clipped_surrogate(logp, old, adv, torch.ones(1, 1, dtype=torch.bool), 0.2, 0.2)
    assert loss.item() == pytest.approx(-1.2)


def test_surrogate_mask_per_token_advantages_and_padding_garbage():
    old = torch.tensor([[-1.0, -2.0, float("-inf")]], dtype=torch.float64)
    logp = torch.tensor([[-1.0, -2.0 + math.log(1.1), float("-inf")]], dtype=torch.float64)
    logp.requires_grad_(True)
    adv = torch.tensor([[2.0, -3.0, 5.0]], dtype=torch.float64)  # per-token (OPD)
    mask = torch.tensor([[True, True, False]])
    loss, stats = clipped_surrogate(logp, old, adv, mask, 0.2, 0.28)
    torch.testing.assert_close(loss, torch.tensor([[-2.0, 3.3, 0.0]], dtype=torch.float64))
    loss.sum().backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[0, 2] == 0 and stats["tokens"].item() == 2
    with pytest.raises(ValueError, match="same shape"):
        clipped_surrogate(logp, old[:, :2], adv, mask)


def test_kl_to_reference_k3():
    logp = torch.tensor([[math.log(0.5), math.log(0.2), 0.0]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.2), float("-inf")]])
    mask = torch.tensor([[True, True, False]])
    kl = kl_to_reference(logp, ref, mask)
    # d = ref - logp = log(1/2): e^d - d - 1 = 0.5 + log 2 - 1
    torch.testing.assert_close(kl, torch.tensor([[0.5 + math.log(2) - 1, 0.0, 0.0]]))
    kl.sum().backward()
    # d/dlogp = 1 - e^(ref - logp) = 0.5; equal tokens have zero gradient; masked too
    torch.testing.assert_close(logp.grad, torch.tensor([[0.5, 0.0, 0.0]]))
    assert (kl_to_reference(torch.randn(3, 4), torch.randn(3, 4)) >= 0).all()


def test_sequence_mean_and_token_mean_hand_computed():
    tl = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    # sequence means 2 and 4 (the empty third sequence adds 0), over 3 sequences
    assert sequence_mean_loss(tl, mask, 3).item() == pytest.approx(2.0)
    assert sequence_mean_loss(tl, mask, 6).item() == pytest.approx(1.0)
    assert token_mean_loss(tl, mask, 4).item() == pytest.approx(10.0 / 4)


def _policy_batch(seed=0, b=8, t=6, vocab=5):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, t, 4, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, vocab, (b, t), generator=g)
    lengths = torch.tensor([6, 1, 3, 5, 2, 6, 4, 3])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    old_logp = torch.randn(b, t, generator=g, dtype=torch.float64) * 0.1 - 1.5
    rewards = torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 0])
    return feats, tokens, mask, old_logp, rewards


def _step_loss(model, feats, tokens, mask, old_logp, adv, num_seq, agg):
    logits = model(feats)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    loss, _ = clipped_surrogate(logp, old_logp, adv, mask, 0.2, 0.28)
    return agg(loss, mask, num_seq)


@pytest.mark.parametrize("agg,norm", [(sequence_mean_loss, "seq"), (token_mean_loss, "tok")])
def test_micro_batches_equal_the_full_batch(agg, norm):
    feats, tokens, mask, old_logp, rewards = _policy_batch()
    adv = group_advantages(rewards, group_size=4).double()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 5).double()
    n = 8 if norm == "seq" else int(mask.sum())

    model.zero_grad()
    full = _step_loss(model, feats, tokens, mask, old_logp, adv, n, agg)
    full.backward()
    g_full = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    total = 0.0
    for sl in (slice(0, 3), slice(3, 6), slice(6, 8)):  # uneven micro-batches
        part = _step_loss(model, feats[sl], tokens[sl], mask[sl], old_logp[sl], adv[sl], n, agg)
        part.backward()  # gradients accumulate as in megatron's schedule
        total += part.item()
    assert total == pytest.approx(full.item(), abs=1e-12)
    for a, b in zip(g_full, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)

    # Averaging per-micro-batch means instead (the usual mistake) gives a different loss.
    naive = 0.0
    for sl in (slice(0, 3), slice(3, 6), slice(6, 8)):
        cnt = sl.stop - sl.start if norm == "seq" else int(mask[sl].sum())
        part = _step_loss(model, feats[sl], tokens[sl], mask[sl], old_logp[sl], adv[sl], cnt, agg)
        naive += part.item() / 3
    assert abs(naive - full.item()) > 1e-4
