"""Qwen3-VL as a megatron model: 3-D positions and logits equal transformers'
``Qwen3VLForConditionalGeneration`` (fp32, tiny model built from a config) on text, one image,
two images of different sizes, a video and a left-padded batch mixing them, at TP=1, TP=2 and
PP=2; and the refusals of what is not supported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import qwen_vl_fixtures as F  # noqa: E402
from harness import run_world  # noqa: E402

from megatron_copd.config import ConfigError  # noqa: E402
from megatron_copd.models.qwen_vl.positions import mrope_position_ids  # noqa: E402
from megatron_copd.models.qwen_vl.hf_config import qwen_vl_from_hf  # noqa: E402
from megatron_copd.models.qwen_vl.spec import spec_from_model  # noqa: E402

CASES = ("text", "image", "two_images", "video", "mixed")
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_setup(tmp_path_factory):
    """The tiny HF model, the cases, its logits, and its import (tools' import_from_hf)."""
    cfg = F.config()
    model = F.build(cfg)
    cases = [F.make_case(n) for n in CASES]
    ref = [F.hf_logits(model, c) for c in cases]
    root = tmp_path_factory.mktemp("qwen3vl")
    _, ckpt = F.import_checkpoint(model, root)
    return cfg, model, cases, ref, str(ckpt)


def _spec(cfg):
    return spec_from_model(qwen_vl_from_hf(cfg.to_dict()).model)


def _max_diff(names, cases, ref, got) -> dict[str, float]:
    out = {}
    for name, c, r, g in zip(names, cases, ref, got):
        real = c["mask"].bool()  # left padding: only real positions are defined
        out[name] = (r[real] - g[real]).abs().max().item()
    return out


def test_positions_equal_transformers_rope_index(hf_setup):
    cfg, model, cases, _, _ = hf_setup
    spec = _spec(cfg)
    for name, c in zip(CASES, cases):
        types = torch.zeros_like(c["ids"])
        types[c["ids"] == F.IMAGE] = 1
        types[c["ids"] == F.VIDEO] = 2
        ref, ref_delta = model.model.get_rope_index(
            c["ids"], types, c["image_grid_thw"],
            None if c["video_grid_thw"] is None else c["video_grid_thw"].clone(), c["mask"])
        pos, delta = mrope_position_ids(c["ids"], spec, c["image_grid_thw"], c["video_grid_thw"],
                                        c["mask"])
        real = c["mask"].bool()
        assert torch.equal(pos[:, real], ref[:, real]), name
        assert torch.equal(delta, ref_delta.view(-1)), name
        if name != "text":  # media really moved the positions off the token index
            assert not torch.equal(pos[0], pos[1]), name


def test_position_errors():
    spec = _spec(F.config())
    c = F.make_case("image")
    with pytest.raises(ValueError, match="placeholder"):
        mrope_position_ids(c["ids"], spec, torch.tensor([[1, 4, 6]]), None, c["mask"])
    with pytest.raises(ValueError, match="2 image grids given but 1"):
        mrope_position_ids(c["ids"], spec, torch.tensor([[1, 4, 4], [1, 4, 4]]), None, c["mask"])


def test_logits_equal_transformers_tp1(hf_setup):
    cfg, _, cases, ref, ckpt = hf_setup
    got = run_world(F.megatron_logits, 1, args=(1, 1, ckpt, cases))[0]
    diffs = _max_diff(CASES, cases, ref, got)
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_logits_equal_transformers_tp2_pp2(hf_setup, tp, pp):
    cfg, _, cases, ref, ckpt = hf_setup
    out = run_world(F.megatron_logits, tp * pp, args=(tp, pp, ckpt, cases))
    diffs = _max_diff(CASES, cases, ref, out[-1])
    assert max(diffs.values()) <= TOL, diffs
    if tp == 2:
        assert all(torch.equal(a, b) for a, b in zip(out[0], out[1]))


def _safetensors(d) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_hf_round_trip_is_bit_exact(hf_setup, tmp_path):
    from megatron_copd.models.conversion.hf_export import convert_to_hf

    _, _, _, _, ckpt = hf_setup
    src = _safetensors(Path(ckpt).parent / "hf")
    res = convert_to_hf(ckpt, tmp_path / "out", with_tokenizer=False)
    assert res.architecture == "Qwen3VLForConditionalGeneration"
    back = _safetensors(tmp_path / "out")
    src.pop("lm_head.weight", None)  # tied: transformers writes it, the export does not
    assert sorted(back) == sorted(src)
    assert all(torch.equal(back[k], src[k]) for k in src)


def test_export_of_tp2_pp2_checkpoint_equals_transformers(hf_setup, tmp_path):
    """Load the import at TP=2 x PP=2 (logits vs transformers), save it there, export that
    checkpoint, and load the export with transformers: same logits as the original model."""
    import transformers as T

    from megatron_copd.models.conversion.hf_export import convert_to_hf

    _, _, cases, ref, ckpt = hf_setup
    resaved = tmp_path / "tp2pp2"
    out = run_world(F.megatron_logits, 4, args=(2, 2, ckpt, cases[1:3], str(resaved)))
    diffs = _max_diff(CASES[1:3], cases[1:3], ref[1:3], out[-1])
    assert max(diffs.values()) <= TOL, diffs
    convert_to_hf(resaved, tmp_path / "hf", with_tokenizer=False)
    model = T.Qwen3VLForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    for c, r in zip(cases, ref):
        assert torch.equal(F.hf_logits(model, c), r)


def test_refusals():
    from megatron_copd.config import RunConfig, validate
    from megatron_copd.config_base import from_dict, to_dict

    for field, value, match in [
        ("hidden_act", "quick_gelu", r"vision_config\.hidden_act"),
        ("patch_size", [16, 16], r"vision_config\.patch_size"),
        ("deepstack_visual_indexes", [0, 5], r"vision_config\.deepstack_visual_indexes"),
        ("num_heads", 3, r"vision_config\.num_heads"),
        ("out_hidden_size", 32, r"vision_config\.out_hidden_size"),
    ]:
        d = F.config().to_dict()
        d["vision_config"][field] = value
        with pytest.raises(ConfigError, match=match):
            qwen_vl_from_hf(d)
    model = to_dict(qwen_vl_from_hf(F.config().to_dict()).model)  # DeepStack into layers 0, 1
    with pytest.raises(ConfigError, match="parallel.pp"):
        validate(from_dict(RunConfig, {"branches": [{"name": "a", "domains": ["text"]}],
                                       "parallel": {"pp": 4}, "model": model}))
    with pytest.raises(ConfigError, match="model.qwen_vl: set either"):
        validate(from_dict(RunConfig, {"branches": [{"name": "a", "domains": ["text"]}],
                                       "model": {**model, "vision": {}}}))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1)])
def test_greedy_decoding_after_media_equals_transformers_generate(hf_setup, tp, pp):
    """16 greedy tokens through the KV cache: decode positions continue after the images /
    video frames (token index + the row's offset), not at the token index."""
    _, model, cases, _, ckpt = hf_setup
    for name in ("mixed", "two_images"):
        case = cases[CASES.index(name)]
        ours = run_world(F.megatron_greedy, tp * pp, args=(tp, pp, ckpt, case, 16))[-1]
        theirs = [F.hf_greedy(model, case, r, 16) for r in range(len(case["ids"]))]
        assert ours == theirs, (name, ours, theirs)


@pytest.mark.parametrize("pp", [1, 2])
def test_scoring_and_cross_branch_teacher_scoring_with_media(hf_setup, pp):
    """Sampled responses after images / video: the rollout's log-probs, local scoring and the
    peer branch's scoring through score_edges (same weights) agree, and equal transformers'."""
    _, model, cases, _, ckpt = hf_setup
    case = cases[CASES.index("mixed")]
    out = [r for r in run_world(F.megatron_exchange, 2 * pp, args=(pp, ckpt, case)) if r]
    assert len(out) == 2  # one last stage per branch
    for r in out:
        for i, resp in enumerate(r["responses"]):
            n = len(resp)
            theirs = F.hf_response_logprobs(model, case, int(r["index"][i]), resp)
            for name in ("rollout", "local", "peer"):
                diff = (r[name][i, :n] - theirs).abs().max().item()
                assert diff <= TOL, (name, i, diff)


def test_model_size_counts_the_vision_tower(hf_setup):
    """copd check's parameter count: the vision tower as transformers builds it."""
    from megatron_copd.model_size import model_size

    cfg, model, _, _, _ = hf_setup
    size = model_size(qwen_vl_from_hf(cfg.to_dict()).model)
    assert size.vision == sum(p.numel() for k, p in model.named_parameters() if "visual" in k)
    assert size.total == sum(p.numel() for k, p in model.named_parameters()
                             if k != "lm_head.weight")  # tied


def test_gradients_equal_transformers(hf_setup):
    """Training goes through the same graph: gradients of a weighted sum of logits (mixed
    batch) equal transformers' for the patch embedding, learned positions, a vision block, a
    DeepStack merger and the (tied) embedding."""
    cfg, _, cases, _, ckpt = hf_setup
    hf = F.build(cfg).train()
    case = cases[CASES.index("mixed")]
    w = torch.randn(F.VOCAB, generator=torch.Generator().manual_seed(0))
    types = torch.zeros_like(case["ids"])
    types[case["ids"] == F.IMAGE] = 1
    types[case["ids"] == F.VIDEO] = 2
    out = hf(input_ids=case["ids"], attention_mask=case["mask"], mm_token_type_ids=types,
             **{k: case[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                     "video_grid_thw")}).logits
    (out[case["mask"].bool()] * w).sum().backward()
    ours = run_world(F.megatron_grads, 1, args=(ckpt, case, w))[0]
    vis = hf.model.visual
    ref = {"patch": vis.patch_embed.proj.weight.grad, "pos": vis.pos_embed.weight.grad,
           "ds_fc1": vis.deepstack_merger_list[0].linear_fc1.weight.grad,
           "emb": hf.model.language_model.embed_tokens.weight.grad,
           "blk0_fc2": vis.blocks[0].mlp.linear_fc2.weight.grad}
    for k, r in ref.items():
        rel = (r - ours[k].view_as(r)).abs().max().item() / r.abs().max().item()
        assert rel <= 1e-5, (k, rel)
