"""Prompt records -> Qwen-VL inputs: transformers' image processor for images, its video processor
for video, Qwen's vision tokens; and the one-line refusals (pixel budget, a processor that patches
differently from the checkpoint, tokenizer ids that are not the configured ones)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from megatron_copd.config import ConfigError, QwenVLConfig  # noqa: E402
from megatron_copd.data.prompting import encode_prompt  # noqa: E402
from megatron_copd.errors import DataError  # noqa: E402
from megatron_copd.models.qwen_vl import processing  # noqa: E402
from megatron_copd.models.qwen_vl.media import QwenVisualInputs  # noqa: E402
from megatron_copd.models.qwen_vl.positions import mrope_position_ids  # noqa: E402
from megatron_copd.models.qwen_vl.spec import QwenVisionSpec  # noqa: E402

Q = QwenVLConfig(patch_size=8, num_position_embeddings=16, min_pixels=1024, max_pixels=4096,
                 vision_start_token_id=5, vision_end_token_id=6, image_token_id=7,
                 video_token_id=8, max_frames=4)


class _Tok:
    """Characters as ids (a stand-in tokenizer: ids 100 + ord % 100)."""

    bos_id, eos_id, pad_id = 1, 2, 3
    image_token_id = None

    def encode(self, text):
        return [100 + ord(c) % 100 for c in text]

    def special_ids(self, text):
        return {"<|vision_start|>": [5], "<|vision_end|>": [6], "<|image_pad|>": [7],
                "<|video_pad|>": [8]}.get(text, self.encode(text))


def _png(path, w, h, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_images_and_video_tokens_and_patches(tmp_path):
    img = _png(tmp_path / "a.png", 32, 48, 0)
    frames = [_png(tmp_path / f"f{i}.png", 32, 32, 10 + i) for i in range(3)]
    rec = {"id": "r1", "prompt": "look <image> then <video> ok", "images": [img],
           "video": frames}
    enc = encode_prompt(rec, _Tok(), Q, 512)
    m = enc.pixels
    assert isinstance(m, QwenVisualInputs)
    assert m.image_grid_thw.tolist() == [[1, 6, 4]]  # 48 x 32 pixels in 8-pixel patches
    assert m.video_grid_thw.tolist() == [[2, 4, 4]]  # 3 frames padded to 4 = 2 temporal patches
    assert m.pixel_values.shape == (24, 3 * 2 * 64) and m.pixel_values_videos.shape == (32, 384)
    ids = enc.token_ids
    assert ids.count(7) == 6 and ids.count(8) == 8 and ids.count(5) == ids.count(6) == 3
    # The image's run is exactly start, 6 pads, end; each temporal patch's run 4 pads.
    i = ids.index(5)
    assert ids[i:i + 8] == [5] + [7] * 6 + [6]
    # Video: a temporal patch pairs frames k and k+1; frame 3 repeats frame 2 (transformers'
    # video processor). Each frame alone through the image processor fills both temporal slots
    # with itself; the two processors agree to float rounding (numpy vs torchvision).
    proc = processing.image_processor(Q)
    pics = [Image.open(f).convert("RGB") for f in frames]
    single = proc(images=pics, return_tensors="pt")["pixel_values"].view(3, 16, 3, 2, 64)
    got = m.pixel_values_videos.view(2, 16, 3, 2, 64)
    assert torch.allclose(got[0, :, :, 0], single[0, :, :, 0], atol=1e-6)
    assert torch.allclose(got[0, :, :, 1], single[1, :, :, 0], atol=1e-6)
    assert torch.allclose(got[1, :, :, 0], single[2, :, :, 0], atol=1e-6)
    assert torch.allclose(got[1, :, :, 1], single[2, :, :, 0], atol=1e-6)
    # The 3-D positions accept the layout (every placeholder run matches its grid).
    spec = QwenVisionSpec(depth=1, hidden_size=32, num_heads=2, intermediate_size=64,
                          out_hidden_size=64, patch_size=8, num_position_embeddings=16,
                          image_token_id=7, video_token_id=8, vision_start_token_id=5,
                          vision_end_token_id=6, mrope_section=(2, 3, 3))
    pos, _ = mrope_position_ids(torch.tensor([ids]), spec, m.image_grid_thw, m.video_grid_thw)
    assert pos.shape == (3, 1, len(ids))


def test_refusals(tmp_path):
    big = _png(tmp_path / "big.png", 80, 64, 1)
    with pytest.raises(DataError, match=r"record r2: images\[0\]: 80 x 64 = 5120 pixels exceeds "
                                        r"the pixel budget model.qwen_vl.max_pixels = 4096"):
        encode_prompt({"id": "r2", "prompt": "<image> what?", "images": [big]}, _Tok(), Q, 512)
    with pytest.raises(DataError, match="vision token of the tokenizer as text"):
        tok = _Tok()
        tok.encode = lambda text: [7]
        encode_prompt({"id": "r3", "prompt": "hi"}, tok, Q, 512)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 16}))
    with pytest.raises(DataError, match=r"preprocessor_config.json: patch_size=16 does not match "
                                        r"the checkpoint's model.qwen_vl.patch_size=8"):
        processing.check_processor_dir(tmp_path, Q)
    processing.check_tokenizer(_Tok(), Q)
    tok = _Tok()
    tok.special_ids = lambda text: [9]
    with pytest.raises(ConfigError, match=r"model.qwen_vl.vision_start_token_id: 5, but the "
                                          r"tokenizer encodes '<\|vision_start\|>' as \[9\]"):
        processing.check_tokenizer(tok, Q)
