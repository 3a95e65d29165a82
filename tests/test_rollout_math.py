"""Pure pieces of rollout: the shared layout, token choice, vocab-parallel math at TP=1."""

import math

import pytest
import torch

from megatron_copd.rollout import layout
from megatron_copd.rollout import vocab_parallel as vp
from megatron_copd.rollout.sampling import (
    SamplingParams,
    choose_tokens,
    derive_seed,
    truncate_logits,
    uniforms,
)


def test_pack_layout_and_masks():
    b = layout.pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert b.prompt_width == 3 and b.response_width == 3
    assert b.tokens.tolist() == [[1, 2, 3, 5, 6, 0], [0, 0, 4, 7, 8, 9]]
    assert b.valid.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert b.response_mask.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    # label column c predicts token c + 1: response tokens are scored at P-1 .. P-1+len-1
    assert b.loss_mask.tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]]
    assert b.labels[0, 2].item() == 5 and b.labels[1, 4].item() == 9
    assert b.response_values(b.labels).tolist() == [[5, 6, 0], [7, 8, 9]]
    m = b.attention_mask  # True = masked
    assert m.shape == (2, 1, 6, 6)
    # row 1, query at column 3 sees columns 2 and 3 only (0, 1 are padding, 4, 5 are future)
    assert (~m[1, 0, 3]).nonzero().flatten().tolist() == [2, 3]
    assert layout.key_padding_mask(b.valid)[1, 0, 0].tolist() == [1, 1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="at least one token"):
        layout.pack([[1], []])


def test_ragged_round_trip():
    vals = torch.arange(12.0).view(3, 4)
    lengths = torch.tensor([2, 0, 4])
    flat = layout.ragged_values(vals, lengths)
    assert flat.tolist() == [0, 1, 8, 9, 10, 11]
    back = layout.unragged_values(flat, lengths, 4, fill=-1)
    assert back.tolist() == [[0, 1, -1, -1], [-1, -1, -1, -1], [8, 9, 10, 11]]


def test_sampler_draws_from_the_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 8) * 1.5
    n = 20000
    params = SamplingParams(max_new_tokens=1, seed=7)
    tokens, lp, slp = choose_tokens(logits.expand(n, 8), params, torch.arange(n), step=3)
    freq = torch.bincount(tokens, minlength=8).double() / n
    probs = torch.softmax(logits[0].double(), -1)
    # ~4.5 sigma of a binomial proportion
    assert ((freq - probs).abs() <= 4.5 * (probs * (1 - probs) / n).sqrt() + 1e-4).all()
    assert torch.allclose(lp, torch.log_softmax(logits, -1)[0, tokens])
    assert torch.equal(lp, slp)  # temperature 1, no truncation: q is the policy


def test_sampler_is_keyed_by_seed_sample_and_step():
    logits = torch.randn(6, 50)
    p = SamplingParams(max_new_tokens=1, seed=3)
    ids = torch.arange(6) + 100
    a = choose_tokens(logits, p, ids, 5)[0]
    # the same rows in another order / batch give the same tokens
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    assert torch.equal(choose_tokens(logits[perm], p, ids[perm], 5)[0], a[perm])
    assert torch.equal(choose_tokens(logits[:2], p, ids[:2], 5)[0], a[:2])
    u = uniforms(3, ids, 5)
    assert ((u > 0) & (u < 1)).all()
    assert not torch.equal(u, uniforms(4, ids, 5)) and not torch.equal(u, uniforms(3, ids, 6))
    assert derive_seed(1, 2) != derive_seed(2, 1) and derive_seed(1, 2) == derive_seed(1, 2)


def test_truncation_top_k_top_p_temperature_greedy():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    neg = torch.finfo(torch.float32).min
    k2 = truncate_logits(logits, SamplingParams(max_new_tokens=1, top_k=2))
    assert (k2[0, 2:] == neg).all() and (k2[0, :2] > neg).all()
    # top_p 0.8: 0.5 + 0.2 < 0.8, so 0.15 is still needed; 0.1 is not
    p8 = truncate_logits(logits, SamplingParams(max_new_tokens=1, top_p=0.8))
    assert (p8[0, :3] > neg).all() and (p8[0, 3:] == neg).all()
    banned = truncate_logits(logits, SamplingParams(max_new_tokens=1, banned_ids=(0,)))
    assert banned[0, 0] == neg
    t2 = truncate_logits(logits, SamplingParams(max_new_tokens=1, temperature=2.0))
    assert torch.allclose(t2, logits / 2)

    rows = torch.randn(32, 40)
    ids = torch.arange(32)
    greedy = choose_tokens(rows, SamplingParams(max_new_tokens=1, temperature=0), ids, 0)
    assert torch.equal(greedy[0], rows.argmax(-1)) and (greedy[2] == 0).all()
    assert torch.equal(
        choose_tokens(rows, SamplingParams(max_new_tokens=1, top_k=1), ids, 0)[0], rows.argmax(-1)
    )
    # tempered sampling: logprob is the untempered policy, sampling_logprob the tempered one
    p = SamplingParams(max_new_tokens=1, temperature=0.7, top_p=0.9)
    tok, lp, slp = choose_tokens(rows, p, ids, 1)
    assert torch.allclose(lp, torch.log_softmax(rows, -1)[ids, tok])
    assert torch.allclose(slp, torch.log_softmax(truncate_logits(rows, p), -1)[ids, tok])
    assert not torch.allclose(lp, slp)


def test_bad_sampling_params():
    for kw in (
        {"max_new_tokens": 0},
        {"max_new_tokens": 1, "temperature": -1},
        {"max_new_tokens": 1, "top_p": 0},
        {"max_new_tokens": 1, "top_k": -2},
    ):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


def test_vocab_parallel_functions_match_torch_at_tp1():
    torch.manual_seed(1)
    logits = torch.randn(3, 7, 50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7))
    ref_lsm = torch.log_softmax(logits, -1)
    lp = vp.token_logprobs(logits, targets)
    assert torch.allclose(lp.double(), ref_lsm.gather(-1, targets[..., None])[..., 0], atol=1e-6)
    ent = vp.entropy(logits)
    ref_ent = -(ref_lsm.exp() * ref_lsm).sum(-1)
    assert torch.allclose(ent.double(), ref_ent, atol=1e-5)
    ids, lps = vp.topk(logits, 5)
    ref_vals, ref_ids = ref_lsm.topk(5, -1)
    assert torch.equal(ids, ref_ids) and torch.allclose(lps.double(), ref_vals, atol=1e-6)
    assert math.isclose(
        vp.logsumexp(logits)[0, 0].item(), logits[0, 0].logsumexp(-1).item(), rel_tol=1e-6
    )
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        vp.topk(logits, 51)


def test_uniforms_for_all_steps_at_once_equal_step_by_step():
    ids = torch.arange(5) * 7
    table = uniforms(9, ids[:, None], torch.arange(4)[None, :])
    for t in range(4):
        assert torch.equal(table[:, t], uniforms(9, ids, t))


def test_aligned_left_round_trip():
    b = layout.pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    aligned = b.aligned_left()
    assert aligned.tolist() == [[1, 2, 3, 5, 6, 0], [4, 7, 8, 9, 0, 0]]
    assert torch.equal(b.from_aligned(aligned), b.tokens)
    vals = torch.arange(24.0).view(2, 6, 2)
    assert torch.equal(b.from_aligned(layout.shift_rows(vals, -b.left_pad)), vals)


def test_kv_batches_group_lengths():
    from megatron_copd.rollout.generation import _kv_batches

    prompts = [[1] * n for n in (3, 1, 3, 2, 3, 1)]
    assert _kv_batches(prompts, 2, False) == [[1, 5], [3, 0], [2, 4]]
    assert _kv_batches(prompts, 2, True) == [[1, 5], [3], [0, 2], [4]]
