"""Prompt encoding: placeholder expansion and placement, pixel order and normalisation, collate
in the order the VLM fills placeholders, and every error message."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_copd.config import VisionConfig
from megatron_copd.data import media
from megatron_copd.data.prompting import collate, encode_prompt, encode_response
from megatron_copd.data.toy import build_toy_tokenizer, build_toy_world
from megatron_copd.errors import DataError

V = VisionConfig()  # 32 px, patch 8: 16 tokens per image, 4 frames
T = V.tokens_per_image
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    world = build_toy_world(tmp_path_factory.mktemp("toy"), seed=4, train_size=100, eval_size=10)
    return build_toy_tokenizer(world)


@pytest.fixture(scope="module")
def pics(tmp_path_factory):
    d = tmp_path_factory.mktemp("pics")
    paths = []
    for i, c in enumerate(COLOURS):
        p = d / f"{i}.png"
        Image.new("RGB", (32, 32), c).save(p)
        paths.append(str(p))
    return paths


def _expected_pixel(rgb):
    return (torch.tensor(rgb) / 255.0 - torch.tensor(media.IMAGE_MEAN)) / torch.tensor(
        media.IMAGE_STD
    )


def _colour_of(pixels):
    """Which COLOURS entry each image [n, 3, H, W] shows."""
    out = []
    for img in pixels:
        mean = img.mean(dim=(1, 2))
        out.append(
            int(np.argmin([float((mean - _expected_pixel(c)).abs().sum()) for c in COLOURS]))
        )
    return out


def rec(prompt, images=(), video=None, rid="r1"):
    return {"id": rid, "prompt": prompt, "images": list(images), "video": video}


def test_text_prompt(tok):
    e = encode_prompt(rec("12 + 3 ="), tok, None, 64)
    assert e.token_ids == [tok.bos_id] + tok.encode("12 + 3 =")
    assert e.pixels is None and e.num_images == 0


def test_images_before_text_without_placeholder(tok, pics):
    e = encode_prompt(rec("How many shapes?", pics[:2]), tok, V, 160)
    img = tok.image_token_id
    assert e.token_ids == [tok.bos_id] + [img] * (2 * T) + tok.encode("How many shapes?")
    assert e.pixels.shape == (2, 3, 32, 32) and e.pixels.dtype == torch.float32
    assert _colour_of(e.pixels) == [0, 1]
    assert torch.allclose(e.pixels[0, :, 5, 7], _expected_pixel(COLOURS[0]), atol=1e-5)


def test_image_placeholders_in_place(tok, pics):
    e = encode_prompt(rec("left <image> middle <image> right", [pics[2], pics[0]]), tok, V, 160)
    img = tok.image_token_id
    expected = (
        [tok.bos_id]
        + tok.encode("left ")
        + [img] * T
        + tok.encode(" middle ")
        + [img] * T
        + tok.encode(" right")
    )
    assert e.token_ids == expected
    assert _colour_of(e.pixels) == [2, 0]


def test_video_frames_sampled_and_placed(tok, pics):
    # 6 frames -> 4 evenly spaced: indices 0, 2, 3, 5.
    e = encode_prompt(rec("Which way?", video=pics), tok, V, 160)
    assert e.token_ids.count(tok.image_token_id) == 4 * T
    assert _colour_of(e.pixels) == [0, 2, 3, 5]
    assert media.sample_frame_indices(6, 4) == [0, 2, 3, 5]
    assert media.sample_frame_indices(3, 4) == [0, 1, 2]
    # An image and a video placed by placeholders: pixels follow the placeholder order.
    e = encode_prompt(rec("<video> then <image>?", [pics[1]], pics[2:4]), tok, V, 200)
    assert _colour_of(e.pixels) == [2, 3, 1]
    ids = e.token_ids
    assert ids[1 : 1 + 2 * T] == [tok.image_token_id] * (2 * T)
    assert ids[1 + 2 * T] != tok.image_token_id


def test_resize_and_grey(tok, tmp_path):
    p = tmp_path / "big.jpg"
    Image.new("L", (64, 48), 128).save(p)
    e = encode_prompt(rec("What?", [p.name]), tok, V, 160, base_dir=tmp_path)
    assert e.pixels.shape == (1, 3, 32, 32)
    assert torch.allclose(e.pixels[0, :, 10, 10], _expected_pixel((128, 128, 128)), atol=0.02)


def test_toy_world_records_encode(tok, tmp_path):
    w = build_toy_world(tmp_path, seed=9, train_size=5, eval_size=5)
    for d in w.domains:
        for row in w.iter_rows(d, "eval"):
            e = encode_prompt(row, tok, V, 160, base_dir=w.path(d, "eval").parent)
            n = {"text": 0, "image": 1, "video": 4}[d]
            assert e.num_images == n and e.token_ids.count(tok.image_token_id) == n * T
            assert len(e.token_ids) <= 100


def test_collate_left_pads_and_orders_like_the_vlm(tok, pics):
    from megatron_copd.models.vlm import _placeholder_order

    prompts = [
        encode_prompt(rec("a <image> b <image>", pics[0:2]), tok, V, 160),
        encode_prompt(rec("text only"), tok, None, 160),
        encode_prompt(rec("c", video=pics[2:5]), tok, V, 160),
    ]
    b = collate(prompts, tok.pad_id)
    lengths = [len(p.token_ids) for p in prompts]
    assert b.lengths.tolist() == lengths and b.tokens.shape == (3, max(lengths))
    for row, p in zip(range(3), prompts):
        n_pad = max(lengths) - len(p.token_ids)
        assert b.tokens[row, n_pad:].tolist() == p.token_ids
        assert (b.tokens[row, :n_pad] == tok.pad_id).all()
        assert b.pad_mask[row].tolist() == [True] * n_pad + [False] * len(p.token_ids)
    assert b.images_per_sample == [2, 0, 3]
    assert _colour_of(b.pixels) == [0, 1, 2, 3, 4]

    # Replay CopdModel.embed's splice with each slot's image index as the "feature": the model
    # fills emb[mask] ([s, b] order) with features permuted by _placeholder_order(input_ids).
    # Sample b's j-th placeholder run must receive sample b's j-th image.
    feats = torch.arange(b.pixels.shape[0]).repeat_interleave(T)
    emb = torch.full(b.tokens.t().shape, -1)
    emb[(b.tokens == tok.image_token_id).t()] = feats[
        _placeholder_order(b.tokens, tok.image_token_id)
    ]
    per_sample = [emb[:, i][emb[:, i] >= 0].tolist() for i in range(3)]
    assert per_sample[0] == [0] * T + [1] * T
    assert per_sample[1] == []
    assert per_sample[2] == [2] * T + [3] * T + [4] * T


def test_collate_without_images(tok):
    b = collate([encode_prompt(rec("1 + 1 ="), tok, None, 16)], tok.pad_id)
    assert b.pixels is None and b.images_per_sample == [0]
    with pytest.raises(ValueError, match="empty batch"):
        collate([], tok.pad_id)


def test_encode_response(tok):
    ids = encode_response("42", tok)
    assert ids[-1] == tok.eos_id and tok.decode(ids) == "42"


# ---------------------------------------------------------------------------------------------
# Errors: one line naming the record.


def _err(fn, pattern):
    with pytest.raises(DataError, match=pattern) as info:
        fn()
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("record r1: ")


def test_errors(tok, pics, tmp_path):
    _err(lambda: encode_prompt(rec("   "), tok, V, 64), "prompt: expected non-empty text")
    _err(lambda: encode_prompt(rec(None), tok, V, 64), "prompt: expected non-empty text")
    _err(
        lambda: encode_prompt(rec("How many shapes?", pics[:1]), tok, V, 10),
        r"prompt: \d+ tokens \(incl. 16 image tokens\) exceed max_prompt_tokens=10",
    )
    _err(
        lambda: encode_prompt(rec("x " * 40), tok, None, 30),
        r"prompt: \d+ tokens \(incl. 0 image tokens\) exceed max_prompt_tokens=30",
    )
    _err(
        lambda: encode_prompt(rec("<image> and <image>", pics[:1]), tok, V, 160),
        r"prompt has 2 <image> placeholder\(s\) but the record has 1 image\(s\)",
    )
    _err(
        lambda: encode_prompt(rec("<image> only"), tok, V, 160),
        r"prompt has 1 <image> placeholder\(s\) but the record has 0 image\(s\)",
    )
    _err(
        lambda: encode_prompt(rec("<image> and <video>", pics[:1]), tok, V, 160),
        r"prompt has 1 <video> placeholder\(s\) but the record has no video",
    )
    _err(
        lambda: encode_prompt(rec("<image>", pics[:1], pics[:2]), tok, V, 160),
        r"prompt has 0 <video> placeholder\(s\) but the record has a video",
    )
    _err(
        lambda: encode_prompt(rec("What?", pics[:1]), tok, None, 160),
        r"has 1 image\(s\) but the model has no vision encoder",
    )
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    _err(
        lambda: encode_prompt(rec("What?", [str(bad)]), tok, V, 160),
        r"images\[0\]: .*bad.png: cannot read image",
    )
    _err(
        lambda: encode_prompt(rec("What?", [pics[0], str(tmp_path / "gone.png")]), tok, V, 160),
        r"images\[1\]: .*gone.png: image file not found",
    )
    _err(
        lambda: encode_prompt(rec("Way?", video=[pics[0], str(bad)]), tok, V, 160),
        r"video: .*bad.png: cannot read image",
    )
    _err(
        lambda: encode_prompt(rec("Way?", video=str(tmp_path / "clip.mp4")), tok, V, 160),
        "video: .*clip.mp4: video file not found",
    )


def test_tokenizer_specific_errors(tok, pics, tmp_path):
    from test_tokenizer import _hf_dir

    from megatron_copd.data.tokenizer import Tokenizer

    no_img = Tokenizer.load(
        _hf_dir(tmp_path / "a", ["<unk>", "<|im_end|>"], image_token=None, pad=None)
    )
    _err(
        lambda: encode_prompt(rec("What?", pics[:1]), no_img, V, 160),
        "has images but the tokenizer has no image placeholder token",
    )
    qwen = Tokenizer.load(_hf_dir(tmp_path / "b", ["<unk>", "<|im_end|>", "<|image_pad|>"]))
    _err(
        lambda: encode_prompt(rec("sneaky <|image_pad|>", pics[:1]), qwen, V, 160),
        r"prompt: contains the tokenizer's image token '<\|image_pad\|>' as text",
    )
    e = encode_prompt(rec("<image> ok", pics[:1]), qwen, V, 160)
    assert e.token_ids[:T] == [qwen.image_token_id] * T  # no BOS for this tokenizer


def test_video_file_needs_pyav(tok, tmp_path, monkeypatch):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 16)
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` fail
    _err(
        lambda: encode_prompt(rec("Way?", video=str(clip)), tok, V, 160),
        r"video: .*clip.mp4: decoding video files needs PyAV; install the multimodal extra",
    )


def test_video_file_decoded_with_pyav(tok, tmp_path):
    av = pytest.importorskip("av")
    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for c in COLOURS:  # six solid-colour frames
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), c, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    e = encode_prompt(rec("Way?", video=str(clip)), tok, V, 160)
    assert e.pixels.shape == (4, 3, 32, 32)
    assert e.token_ids.count(tok.image_token_id) == 4 * T
    assert _colour_of(e.pixels) == [0, 2, 3, 5]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 64)
    _err(
        lambda: encode_prompt(rec("Way?", video=str(broken)), tok, V, 160),
        "video: .*broken.mp4: cannot decode video",
    )
