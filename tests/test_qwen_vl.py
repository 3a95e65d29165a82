"""Qwen3-VL as a megatron model: 3-D positions and logits equal transformers'
``Qwen3VLForConditionalGeneration`` (fp32, tiny model built from a config) on text, one image,
two images of different sizes, a video and a left-padded batch mixing them, at TP=1, TP=2 and
PP=2; and the refusals of what is not supported."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import qwen_vl_fixtures as F  # noqa: E402
from harness import run_world  # noqa: E402

from megatron_copd.config import ConfigError  # noqa: E402
from megatron_copd.models.qwen_vl.positions import mrope_position_ids  # noqa: E402
from megatron_copd.models.qwen_vl.spec import vision_spec_from_hf  # noqa: E402

CASES = ("text", "image", "two_images", "video", "mixed")
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_setup(tmp_path_factory):
    cfg = F.config()
    model = F.build(cfg)
    cases = [F.make_case(n) for n in CASES]
    ref = [F.hf_logits(model, c) for c in cases]
    ckpt = F.write_checkpoint(model, tmp_path_factory.mktemp("qwen3vl") / "ckpt")
    return cfg, model, cases, ref, str(ckpt)


def _max_diff(cases, ref, got) -> dict[str, float]:
    out = {}
    for name, c, r, g in zip(CASES, cases, ref, got):
        real = c["mask"].bool()  # left padding: only real positions are defined
        out[name] = (r[real] - g[real]).abs().max().item()
    return out


def test_positions_equal_transformers_rope_index(hf_setup):
    cfg, model, cases, _, _ = hf_setup
    spec = vision_spec_from_hf(cfg.to_dict())
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
    spec = vision_spec_from_hf(F.config().to_dict())
    c = F.make_case("image")
    with pytest.raises(ValueError, match="placeholder"):
        mrope_position_ids(c["ids"], spec, torch.tensor([[1, 4, 6]]), None, c["mask"])
    with pytest.raises(ValueError, match="2 image grids given but 1"):
        mrope_position_ids(c["ids"], spec, torch.tensor([[1, 4, 4], [1, 4, 4]]), None, c["mask"])


def test_logits_equal_transformers_tp1(hf_setup):
    cfg, _, cases, ref, ckpt = hf_setup
    got = run_world(F.megatron_logits, 1, args=(1, 1, cfg.to_dict(), ckpt, cases))[0]
    diffs = _max_diff(cases, ref, got)
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_logits_equal_transformers_tp2_pp2(hf_setup, tp, pp):
    cfg, _, cases, ref, ckpt = hf_setup
    out = run_world(F.megatron_logits, tp * pp, args=(tp, pp, cfg.to_dict(), ckpt, cases))
    diffs = _max_diff(cases, ref, out[-1])
    assert max(diffs.values()) <= TOL, diffs
    if tp == 2:
        assert all(torch.equal(a, b) for a, b in zip(out[0], out[1]))


def test_refusals():
    from megatron_copd.config import RunConfig
    from megatron_copd.config_base import from_dict
    from megatron_copd.models.qwen_vl.model import check_layout

    d = F.config().to_dict()
    d["vision_config"]["hidden_act"] = "quick_gelu"
    with pytest.raises(ConfigError, match=r"vision_config\.hidden_act"):
        vision_spec_from_hf(d)
    d = F.config().to_dict()
    d["vision_config"]["patch_size"] = [16, 16]
    with pytest.raises(ConfigError, match=r"vision_config\.patch_size"):
        vision_spec_from_hf(d)
    d = F.config().to_dict()
    d["vision_config"]["deepstack_visual_indexes"] = [0, 5]
    with pytest.raises(ConfigError, match="deepstack_visual_indexes"):
        vision_spec_from_hf(d)
    spec = vision_spec_from_hf(F.config().to_dict())  # DeepStack into decoder layers 0 and 1
    cfg = from_dict(RunConfig, {"branches": [{"name": "a"}], "parallel": {"pp": 4},
                                "model": {"num_layers": 4}})
    with pytest.raises(ConfigError, match="parallel.pp"):
        check_layout(cfg, spec)
