"""Qwen2.5-VL as a megatron model: the attention windows and 3-D positions equal transformers',
and logits equal ``Qwen2_5_VLForConditionalGeneration`` (fp32, tiny model built from a config:
windowed vision attention with full-attention layers, RMSNorm / SwiGLU tower, block MRoPE, a
Qwen2 decoder with Q/K/V bias) on text, one image, two images of different sizes, a video and
a left-padded batch mixing them, at TP=1, TP=2 and PP=2; the HF round trip; greedy decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import qwen_vl_fixtures as F  # noqa: E402
from harness import run_world  # noqa: E402

from megatron_copd.config import ConfigError  # noqa: E402
from megatron_copd.models.qwen_vl import positions  # noqa: E402
from megatron_copd.models.qwen_vl.hf_config import qwen_vl_from_hf  # noqa: E402
from megatron_copd.models.qwen_vl.spec import spec_from_model  # noqa: E402

CASES = ("text", "image", "two_images", "video", "mixed")
TOL = 1e-4
V = "qwen2_5_vl"


@pytest.fixture(scope="module")
def hf_setup(tmp_path_factory):
    cfg = F.config25()
    model = F.build(cfg)
    cases = [F.make_case(n, version=V) for n in CASES]
    ref = [F.hf_logits(model, c) for c in cases]
    root = tmp_path_factory.mktemp("qwen25vl")
    _, ckpt = F.import_checkpoint(model, root)
    return cfg, model, cases, ref, str(ckpt)


def _max_diff(cases, ref, got, names=CASES) -> dict[str, float]:
    return {n: (r[c["mask"].bool()] - g[c["mask"].bool()]).abs().max().item()
            for n, c, r, g in zip(names, cases, ref, got)}


def test_windows_equal_transformers():
    """The same patches attend together as in transformers' window index (windows of 2 x 2
    merged tokens; grids not divisible by the window give smaller edge windows)."""
    from transformers.vision_utils import get_vision_window_index

    grid = torch.tensor([[1, 8, 6], [2, 6, 10], [1, 4, 4]])
    index, cu = get_vision_window_index(grid, spatial_merge_size=2, window_size=56, patch_size=14)
    order = (index[:, None] * 4 + torch.arange(4)).reshape(-1)  # merged tokens -> patches
    theirs = {tuple(sorted(order[a:b].tolist())) for a, b in zip(cu[:-1], cu[1:])}
    ours = positions.window_segments(grid, 2, 2)
    assert {tuple(sorted(w.tolist())) for w in ours} == theirs
    assert sorted(torch.cat(ours).tolist()) == list(range(int(grid.prod(-1).sum())))
    assert len({len(w) for w in ours}) > 1  # edge windows are smaller


def test_positions_equal_transformers_rope_index(hf_setup):
    """Including the video's temporal positions scaled by tokens_per_second x seconds per
    temporal patch (0.5 s here, and the default 1 s)."""
    cfg, model, cases, _, _ = hf_setup
    spec = spec_from_model(qwen_vl_from_hf(cfg.to_dict()).model)
    for name, c in zip(CASES, cases):
        types = torch.zeros_like(c["ids"])
        types[c["ids"] == F.IMAGE] = 1
        types[c["ids"] == F.VIDEO] = 2
        n_videos = 0 if c["video_grid_thw"] is None else len(c["video_grid_thw"])
        for seconds in (None, [0.5] * n_videos):
            ref, ref_delta = model.model.get_rope_index(
                c["ids"], types, c["image_grid_thw"], c["video_grid_thw"],
                None if seconds is None else torch.tensor(seconds), c["mask"])
            got, delta = positions.mrope_position_ids(
                c["ids"], spec, c["image_grid_thw"], c["video_grid_thw"], c["mask"], seconds)
            real = c["mask"].bool()
            assert torch.equal(got[:, real], ref[:, real]), (name, seconds)
            assert torch.equal(delta, ref_delta.view(-1)), (name, seconds)


def test_logits_equal_transformers_tp1(hf_setup):
    _, _, cases, ref, ckpt = hf_setup
    got = run_world(F.megatron_logits, 1, args=(1, 1, ckpt, cases))[0]
    diffs = _max_diff(cases, ref, got)
    print("max |logit diff|", diffs)
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_logits_equal_transformers_tp2_pp2(hf_setup, tp, pp):
    _, _, cases, ref, ckpt = hf_setup
    got = run_world(F.megatron_logits, tp * pp, args=(tp, pp, ckpt, cases))[-1]
    diffs = _max_diff(cases, ref, got)
    print("max |logit diff|", diffs)
    assert max(diffs.values()) <= TOL, diffs


def test_hf_round_trip_is_bit_exact(hf_setup, tmp_path):
    import transformers as T
    from safetensors.torch import load_file

    from megatron_copd.models.conversion.hf_export import convert_to_hf

    _, _, cases, ref, ckpt = hf_setup

    def tensors(d: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    src = tensors(Path(ckpt).parent / "hf")
    res = convert_to_hf(ckpt, tmp_path / "out", with_tokenizer=False)
    assert res.architecture == "Qwen2_5_VLForConditionalGeneration"
    back = tensors(tmp_path / "out")
    assert sorted(back) == sorted(src)
    assert all(torch.equal(back[k], src[k]) for k in src)
    model = T.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    assert torch.equal(F.hf_logits(model, cases[-1]), ref[-1])


def test_greedy_decoding_after_media_equals_transformers_generate(hf_setup):
    """16 greedy tokens through the KV cache: decode positions continue after the images and
    the video (whose temporal positions run ahead of its token count)."""
    _, model, cases, _, ckpt = hf_setup
    case = cases[CASES.index("mixed")]
    ours = run_world(F.megatron_greedy, 1, args=(1, 1, ckpt, case, 16))[0]
    theirs = [F.hf_greedy(model, case, r, 16) for r in range(len(case["ids"]))]
    assert ours == theirs


def test_refusals():
    cfg = F.config25().to_dict()
    model = qwen_vl_from_hf(cfg).model
    assert model.family == "qwen2" and model.qwen_vl.version == V
    assert model.qwen_vl.fullatt_block_indexes == [1, 3] and not model.qwen_vl.mrope_interleaved
    for change, field in [
        ({"hidden_act": "gelu"}, "vision_config.hidden_act"),
        ({"fullatt_block_indexes": [7]}, "vision_config.fullatt_block_indexes"),
        ({"window_size": 50}, "vision_config.window_size"),
    ]:
        bad = {**cfg, "vision_config": {**cfg["vision_config"], **change}}
        with pytest.raises(ConfigError, match=field):
            qwen_vl_from_hf(bad)
    with pytest.raises(ConfigError, match="qwen2_vl"):
        from megatron_copd.models.conversion.families import model_config_from_hf

        model_config_from_hf({**cfg, "model_type": "qwen2_vl"}, "config.json")


def test_export_of_tp2_pp2_checkpoint_equals_transformers(hf_setup, tmp_path):
    """Load the import at TP=2 x PP=2 (logits vs transformers), save it there, export that
    checkpoint, and load the export with transformers: the original model's logits."""
    import transformers as T

    from megatron_copd.models.conversion.hf_export import convert_to_hf

    _, _, cases, ref, ckpt = hf_setup
    resaved = tmp_path / "tp2pp2"
    got = run_world(F.megatron_logits, 4, args=(2, 2, ckpt, cases[1:3], str(resaved)))[-1]
    diffs = _max_diff(cases[1:3], ref[1:3], got, CASES[1:3])
    assert max(diffs.values()) <= TOL, diffs
    convert_to_hf(resaved, tmp_path / "hf", with_tokenizer=False)
    model = T.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    for c, r in zip(cases, ref):
        assert torch.equal(F.hf_logits(model, c), r)


def test_model_size_counts_like_transformers(hf_setup):
    """copd check's parameter count (vision tower and the decoder's Q/K/V biases)."""
    from megatron_copd.model_size import model_size

    cfg, model, _, _, _ = hf_setup
    size = model_size(qwen_vl_from_hf(cfg.to_dict()).model)
    assert size.vision == sum(p.numel() for k, p in model.named_parameters() if "visual" in k)
    assert size.total == sum(p.numel() for p in model.parameters())  # untied head counted
