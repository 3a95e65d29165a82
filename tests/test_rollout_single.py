"""Rollout and scoring on one process (TP=PP=1): KV cache vs recompute, padding invariance,
sampler features, scoring vs a full-vocabulary reference, bad inputs.

All checks run in one spawned worker (start-up is the expensive part); each test asserts its part
of the worker's report.
"""

import dataclasses

import pytest
import torch
from harness import run_world
from rollout_util import IMAGE_TOKEN, build, full_logits, groups, prompts_for

from megatron_copd.errors import DataError
from megatron_copd.rollout import layout
from megatron_copd.rollout.fast_decode import unsupported_reason
from megatron_copd.rollout.generation import KVDecoder, generate, inference_forward
from megatron_copd.rollout.sampling import SamplingParams
from megatron_copd.rollout.scoring import ScoreSpec, score_responses

R = 6


def _kv_vs_full(model, g, prompts, responses, pixels=None):
    """Max |logit| difference: KV prefill + teacher-forced decode vs one full forward."""
    batch = layout.pack(prompts, responses)
    full = full_logits(model, g, batch, pixels)
    p, t = batch.prompt_width, batch.width
    key_mask = layout.key_padding_mask(batch.valid)
    with inference_forward(model):
        dec = KVDecoder(model, g.pgs, batch.batch_size, t, all_logits=True)
        pre = dec.prefill(batch.tokens[:, :p], batch.valid[:, :p], pixels)
        steps = [
            dec.step(batch.tokens[:, c], batch.position_ids[:, c], key_mask[..., : c + 1])
            for c in range(p, t)
        ]
    err_prefill = ((pre - full[:, :p]).abs().amax(-1) * batch.valid[:, :p]).max().item()
    dec_logits = torch.stack(steps, dim=1)
    err_decode = ((dec_logits - full[:, p:]).abs().amax(-1) * batch.valid[:, p:]).max().item()
    return max(err_prefill, err_decode), full.abs().max().item()


def _error(fn) -> str:
    try:
        fn()
    except DataError as e:
        return f"DataError: {e}"
    except Exception as e:  # noqa: BLE001 - reported to the test
        return f"{type(e).__name__}: {e}"
    return "no error"


def _single_worker(rank, world):
    out = {}
    g = groups()
    text = build(g, 3)
    vlm = build(g, 4, vision=True)

    # --- KV cache vs full recompute -----------------------------------------------------------
    prompts = prompts_for(1, 4)
    responses = prompts_for(2, 4, lo=1, hi=R)
    out["kv_text"] = _kv_vs_full(text, g, prompts, responses)
    vprompts = [list(p) for p in prompts]
    vprompts[0] = vprompts[0][:1] + [IMAGE_TOKEN] * 4 + vprompts[0][1:]
    vprompts[2] = [IMAGE_TOKEN] * 8 + vprompts[2]
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    out["kv_vlm"] = _kv_vs_full(vlm, g, vprompts, responses, pixels)
    # the images matter (otherwise the VLM check would prove little)
    out["vlm_images_matter"] = _logit_gap(vlm, g, vprompts, responses, pixels) > 1e-3

    # --- left padding does not change logits --------------------------------------------------
    short, long_ = prompts[0], prompts_for(9, 1, lo=20, hi=20)[0]
    alone = full_logits(text, g, layout.pack([short], [responses[0]]))[0]
    padded_batch = layout.pack([long_, short], [responses[1], responses[0]])
    padded = full_logits(text, g, padded_batch)[1][padded_batch.valid[1]]
    out["left_pad"] = (alone - padded).abs().max().item()

    # --- generation ---------------------------------------------------------------------------
    params = SamplingParams(max_new_tokens=R, seed=11, temperature=0.9, top_p=0.95)
    a = generate(
        vlm, g.pgs, vprompts, params, pixels=pixels, samples_per_prompt=3, kv_batch_size=64
    )
    b = generate(vlm, g.pgs, vprompts, params, pixels=pixels, samples_per_prompt=3, kv_batch_size=2)
    # as with Transformer Engine attention: KV batches of equal-length prompts only
    import megatron_copd.rollout.generation as gen_mod

    real = gen_mod.attention_applies_masks
    gen_mod.attention_applies_masks = lambda model: False
    try:
        c = generate(vlm, g.pgs, vprompts, params, pixels=pixels, samples_per_prompt=3)
    finally:
        gen_mod.attention_applies_masks = real
    out["batching_same_tokens"] = torch.equal(a.tokens, b.tokens) and torch.equal(
        a.tokens, c.tokens
    )
    out["batching_lp"] = (a.logprobs - b.logprobs).abs().max().item()
    out["samples_differ"] = not torch.equal(a.tokens[0], a.tokens[1])
    ref = score_responses(
        vlm,
        g.pgs,
        a.sample_prompts(),
        a.responses(),
        pixels=a.sample_pixels(),
        spec=ScoreSpec(topk=0, entropy=False),
    )
    mask = torch.arange(R)[None] < a.lengths[:, None]
    out["rollout_lp_vs_scoring"] = ((a.logprobs - ref.logprobs).abs() * mask).max().item()
    out["sampling_lp_differs"] = bool(((a.logprobs - a.sampling_logprobs).abs() > 1e-4).any())
    out["no_image_token_sampled"] = bool((a.tokens != IMAGE_TOKEN).all())

    # padding invariance of generation: the short prompt alone vs next to a long one
    gp = SamplingParams(max_new_tokens=R, seed=5)
    alone_ro = generate(text, g.pgs, [short], gp)
    mixed_ro = generate(text, g.pgs, [short, long_], gp)
    out["pad_gen_tokens"] = torch.equal(alone_ro.tokens[0], mixed_ro.tokens[0])
    out["pad_gen_lp"] = (alone_ro.logprobs[0] - mixed_ro.logprobs[0]).abs().max().item()

    # stop ids: make half the vocabulary a stop id so that samples stop early
    sp = SamplingParams(max_new_tokens=R, seed=2, stop_ids=tuple(range(256)))
    s = generate(text, g.pgs, prompts, sp, samples_per_prompt=4, pad_id=1)
    ok = True
    for row, n, fin, lp in zip(s.tokens, s.lengths, s.finished, s.logprobs):
        n = int(n)
        ok &= bool((row[n:] == 1).all()) and bool((lp[n:] == 0).all())
        ok &= bool((row[: n - 1] >= 256).all())  # no stop id before the end
        ok &= bool(fin) == bool(row[n - 1] < 256)
        ok &= bool(fin) or n == R
    out["stop_ids_ok"] = ok
    out["some_stopped_early"] = bool((s.lengths < R).any()) and bool(s.finished.any())

    # the fast decode step (finished rows leave the batch) vs megatron's decode step
    out["fast_supported"] = [unsupported_reason(m) for m in (text, vlm)]
    fast_vs_slow = {}
    for name, model, kw in (
        ("text_stops", text, dict(prompts=prompts, pad_id=1, samples_per_prompt=4)),
        ("vlm", vlm, dict(prompts=vprompts, pixels=pixels, samples_per_prompt=3)),
        # greedy, one sample per prompt, KV batches of 2: a row stops at the first token and
        # leaves the batch before the first decode step
        ("text_g1", text, dict(prompts=prompts_for(1, 5), kv_batch_size=2)),
    ):
        sp2 = dataclasses.replace(sp, stop_ids=tuple(range(6, 140)), max_new_tokens=12)
        if name == "text_g1":
            sp2 = SamplingParams(max_new_tokens=6, temperature=0, stop_ids=tuple(range(6, 200)))
        try:
            fast = generate(model, g.pgs, params=sp2, topk=3, **kw)
        except Exception as e:  # noqa: BLE001 - reported to the test
            fast_vs_slow[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        slow = generate(model, g.pgs, params=sp2, topk=3, fast_decode=False, **kw)
        ref = score_responses(
            model, g.pgs, fast.sample_prompts(), fast.responses(),
            pixels=fast.sample_pixels(), spec=ScoreSpec(topk=0, entropy=False),
        )
        w = ref.logprobs.shape[1]  # the longest response
        m = torch.arange(w)[None] < fast.lengths[:, None]
        fast_vs_slow[name] = {
            "same": all(torch.equal(getattr(fast, k), getattr(slow, k))
                        for k in ("tokens", "lengths", "finished", "topk_ids")),
            "lp": (fast.logprobs - slow.logprobs).abs().max().item(),
            "lp_vs_recompute": ((fast.logprobs[:, :w] - ref.logprobs).abs() * m).max().item(),
            "ragged": len(set(fast.lengths.tolist())) > 1,
        }
    out["fast_vs_slow"] = fast_vs_slow

    # greedy decoding picks the argmax of the recomputed distribution
    gr = generate(text, g.pgs, prompts, SamplingParams(max_new_tokens=R, temperature=0))
    sc = score_responses(text, g.pgs, prompts, gr.responses(), spec=ScoreSpec(topk=1))
    out["greedy_is_argmax"] = torch.equal(sc.topk_ids[..., 0], gr.tokens)

    # after rollout, training forward/backward still works (InferenceMode off, no inference
    # tensors cached in the rotary table), at exactly the rollout's cache length
    from megatron.core.inference.utils import InferenceMode

    out["inference_mode_off"] = not InferenceMode.is_active()
    out["outputs_are_normal_tensors"] = not any(
        t.is_inference() for t in (gr.tokens, gr.lengths, gr.logprobs, gr.sampling_logprobs)
    )
    text.train()
    cache_len = max(len(p) for p in prompts) + R  # the rotary table length decoding used
    tb = layout.pack([prompts[0]], [gr.responses()[0]], response_width=cache_len - len(prompts[0]))
    logits = text(tb.tokens, tb.position_ids, tb.attention_mask)
    logits.float().sum().backward()
    out["train_backward_ok"] = text.language_model.decoder.final_layernorm.weight.grad is not None
    text.eval()

    # --- scoring vs a full-vocabulary single-process reference --------------------------------
    spec = ScoreSpec(topk=10, entropy=True, topk_logprobs=True)
    got = score_responses(text, g.pgs, prompts, responses, spec=spec, micro_batch_size=3)
    batch = layout.pack(prompts, responses)
    lsm = torch.log_softmax(full_logits(text, g, batch).double(), -1)
    lsm = batch.response_values(lsm)
    targets = batch.response_values(batch.labels)
    rmask = torch.arange(batch.response_width)[None] < batch.response_lens[:, None]
    ref_lp = lsm.gather(-1, targets[..., None])[..., 0]
    ref_ent = -(lsm.exp() * lsm).sum(-1)
    ref_vals, ref_ids = lsm.topk(10, -1)
    out["score_lp"] = ((got.logprobs - ref_lp).abs() * rmask).max().item()
    out["score_entropy"] = ((got.entropy - ref_ent).abs() * rmask).max().item()
    out["score_topk_ids"] = bool((got.topk_ids == ref_ids)[rmask].all())
    out["score_topk_lp"] = ((got.topk_logprobs - ref_vals).abs()[rmask]).max().item()

    # --- bad input -> one clear DataError --------------------------------------------------------
    p1 = SamplingParams(max_new_tokens=4)
    out["errors"] = {
        "empty": _error(lambda: generate(text, g.pgs, [[7, 8], []], p1)),
        "too_long": _error(lambda: generate(text, g.pgs, [[7] * 126], p1)),
        "bad_id": _error(lambda: generate(text, g.pgs, [[7, 600]], p1)),
        "image_count": _error(lambda: generate(vlm, g.pgs, vprompts, p1, pixels=pixels[:2])),
        "image_partial": _error(lambda: generate(vlm, g.pgs, [[IMAGE_TOKEN] * 3 + [9]], p1)),
        "pixels_text": _error(lambda: generate(text, g.pgs, [[7, 8]], p1, pixels=pixels[:1])),
        "image_in_response": _error(
            lambda: score_responses(vlm, g.pgs, [[7, 8]], [[9, IMAGE_TOKEN]])
        ),
        "score_too_long": _error(lambda: score_responses(text, g.pgs, [[7] * 100], [[8] * 29])),
    }
    return out


def _logit_gap(model, g, prompts, responses, pixels):
    batch = layout.pack(prompts, responses)
    a = full_logits(model, g, batch, pixels)
    b = full_logits(model, g, batch, torch.zeros_like(pixels))
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def report():
    return run_world(_single_worker, 1)[0]


def test_kv_cache_equals_full_recompute(report):
    for key in ("kv_text", "kv_vlm"):
        err, scale = report[key]
        assert err <= 1e-5, (key, err)
        assert scale > 1e-2  # logits are not trivially zero
    assert report["vlm_images_matter"]


def test_left_padding_does_not_change_logits(report):
    assert report["left_pad"] <= 1e-5
    assert report["pad_gen_tokens"] and report["pad_gen_lp"] <= 1e-5


def test_generation_features(report):
    assert report["batching_same_tokens"] and report["batching_lp"] <= 1e-5
    assert report["samples_differ"]
    assert report["rollout_lp_vs_scoring"] <= 1e-5
    assert report["sampling_lp_differs"]  # temperature 0.9 / top-p: q != pi
    assert report["no_image_token_sampled"]
    assert report["stop_ids_ok"] and report["some_stopped_early"]
    assert report["fast_supported"] == [None, None]  # the test models take the fast decode step
    for name, r in report["fast_vs_slow"].items():
        assert "error" not in r, (name, r)
        assert r["same"] and r["lp"] <= 1e-5 and r["lp_vs_recompute"] <= 1e-5, (name, r)
        assert r["ragged"], name  # rows finished at different steps and left the batch
    assert report["greedy_is_argmax"]
    assert report["inference_mode_off"] and report["train_backward_ok"]
    assert report["outputs_are_normal_tensors"]


def test_scoring_matches_full_vocab_reference(report):
    assert report["score_lp"] <= 1e-5
    assert report["score_entropy"] <= 1e-5
    assert report["score_topk_ids"]
    assert report["score_topk_lp"] <= 1e-5


@pytest.mark.parametrize(
    "case,expected",
    [
        ("empty", "prompt 1: empty"),
        ("too_long", "prompt 0: 126 prompt tokens + 4 new tokens = 130 exceeds the model context"),
        ("bad_id", "prompt 0: token id 600 is not an integer in [0, 512)"),
        ("image_count", "pixels: 2 image(s) given but the prompts hold placeholders for 3 images"),
        ("image_partial", "not a multiple of tokens_per_image = 4"),
        ("pixels_text", "pixels: 1 image(s) given to a text-only model"),
        ("image_in_response", "response 0: contains the media placeholder id 5"),
        ("score_too_long", "sequence 0: 100 prompt + 29 response tokens = 129 exceeds"),
    ],
)
def test_bad_input_is_one_clear_error(report, case, expected):
    msg = report["errors"][case]
    assert msg.startswith("DataError: ") and expected in msg, msg
