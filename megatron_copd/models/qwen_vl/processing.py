"""Prompt records -> a Qwen-VL model's inputs: token ids with the vision tokens of Qwen's chat
template and the images through transformers' Qwen2-VL image processor (the one Qwen3-VL uses),
built from ``model.qwen_vl`` (no hub).

Token layout of an image: ``<|vision_start|> <|image_pad|> x n <|vision_end|>`` with
``n = t * h * w / merge^2`` for its (t, h, w) patch grid, the expanded form the model takes.
Placement follows the project's prompt rules (``data.prompting``): ``<image>`` in the prompt text
takes the next image, a prompt without placeholders gets its images first.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from megatron_copd.config import QwenVLConfig
from megatron_copd.errors import DataError
from megatron_copd.models.qwen_vl.media import QwenVisualInputs

IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)  # Qwen3-VL's processor statistics
PROCESSOR_FILE = "preprocessor_config.json"
# Processor fields that must agree with the checkpoint's vision tower.
_MATCH = {"patch_size": "patch_size", "temporal_patch_size": "temporal_patch_size",
          "merge_size": "spatial_merge_size"}


def image_processor(q: QwenVLConfig):
    """transformers' PIL Qwen2-VL image processor with this model's patch sizes and budget."""
    return _processor(q.patch_size, q.temporal_patch_size, q.spatial_merge_size, q.min_pixels,
                      q.max_pixels)


@functools.lru_cache(maxsize=8)
def _processor(patch: int, temporal: int, merge: int, min_pixels: int, max_pixels: int):
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )
    except ImportError:
        raise DataError("Qwen-VL images need transformers' image processor: pip install "
                        "'megatron-copd[hf]'") from None
    return Qwen2VLImageProcessorPil(
        patch_size=patch, temporal_patch_size=temporal, merge_size=merge,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))


def processor_config(q: QwenVLConfig) -> dict:
    """``preprocessor_config.json`` of :func:`image_processor` (written by the HF export)."""
    return {"image_processor_type": "Qwen2VLImageProcessor", "do_resize": True,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "do_convert_rgb": True, "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD),
            "patch_size": q.patch_size, "temporal_patch_size": q.temporal_patch_size,
            "merge_size": q.spatial_merge_size,
            "size": {"shortest_edge": q.min_pixels, "longest_edge": q.max_pixels}}


TOKEN_TEXTS = {"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
               "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"}


def check_tokenizer(tokenizer, q: QwenVLConfig) -> None:
    """The configured vision token ids must be the tokenizer's ids of Qwen's vision tokens."""
    from megatron_copd.config import ConfigError

    for field, text in TOKEN_TEXTS.items():
        ids = tokenizer.special_ids(text)
        want = getattr(q, field)
        if ids != [want]:
            raise ConfigError(f"model.qwen_vl.{field}: {want}, but the tokenizer encodes "
                              f"{text!r} as {ids} (expected one id equal to it)")


def check_processor_dir(d: str | os.PathLike, q: QwenVLConfig) -> None:
    """A ``preprocessor_config.json`` (e.g. the one imported with a Qwen3-VL tokenizer) must
    patch images the way the model's vision tower expects."""
    path = Path(d) / PROCESSOR_FILE
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    for theirs, ours in _MATCH.items():
        if theirs in cfg and int(cfg[theirs]) != getattr(q, ours):
            raise DataError(f"{path}: {theirs}={cfg[theirs]} does not match the checkpoint's "
                            f"model.qwen_vl.{ours}={getattr(q, ours)}")


def open_image(path: Path, field: str, q: QwenVLConfig, fail) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            image = img.convert("RGB")
    except FileNotFoundError:
        raise fail(f"{field}: {path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise fail(f"{field}: {path}: cannot read image: {e}") from None
    return check_budget(image, field, q, fail)


def check_budget(image: Image.Image, field: str, q: QwenVLConfig, fail) -> Image.Image:
    w, h = image.size
    if w * h > q.max_pixels:
        raise fail(f"{field}: {w} x {h} = {w * h} pixels exceeds the pixel budget "
                   f"model.qwen_vl.max_pixels = {q.max_pixels}")
    return image


def encode_images(paths: list[Path], q: QwenVLConfig, fail) -> QwenVisualInputs | None:
    if not paths:
        return None
    images = [open_image(path, f"images[{i}]", q, fail) for i, path in enumerate(paths)]
    out = image_processor(q)(images=images, return_tensors="pt")
    return QwenVisualInputs(out["pixel_values"].float(), out["image_grid_thw"].long())


def encode_video(frames: list[Image.Image], q: QwenVLConfig, fail) -> QwenVisualInputs:
    """Frames of one video -> its patch rows and (t, h, w) grid.

    Each frame goes through the image processor (the same resize, normalisation and patch
    order as an image, which fills both temporal slots with the frame); consecutive frames are
    then paired into one temporal patch. An odd frame count repeats the last frame."""
    frames = [check_budget(f, "video", q, fail) for f in frames]
    tps = q.temporal_patch_size
    frames += [frames[-1]] * (-len(frames) % tps)
    out = image_processor(q)(images=frames, return_tensors="pt")
    grid = out["image_grid_thw"]
    if not bool((grid == grid[0]).all()):
        raise fail("video: its frames differ in size")
    n = int(grid[0].prod())  # patch rows per frame
    p2 = q.patch_size ** 2
    rows = out["pixel_values"].float().view(len(frames), n, 3, tps, p2)[:, :, :, 0]
    pairs = rows.view(len(frames) // tps, tps, n, 3, p2).permute(0, 2, 3, 1, 4)
    values = pairs.reshape(len(frames) // tps * n, 3 * tps * p2)
    t, h, w = len(frames) // tps, int(grid[0, 1]), int(grid[0, 2])
    return QwenVisualInputs(pixel_values_videos=values, video_grid_thw=torch.tensor([[t, h, w]]))


def timestamp(k: int, q: QwenVLConfig) -> str:
    """Qwen3-VL writes a time before each temporal patch of a video; frames are taken as
    sampled at 2 per second (Qwen3-VL's default sampling rate)."""
    return f"<{k * q.temporal_patch_size / 2.0:.1f} seconds>"


def prompt_ids(parts: list[str], media: QwenVisualInputs | None, q: QwenVLConfig,
               encode, bos: int | None) -> list[int]:
    """Token ids of the prompt ``parts`` (text, ``<image>`` and ``<video>`` markers, in order)."""
    ids = [] if bos is None else [bos]
    images = [] if media is None or media.image_grid_thw is None else media.image_grid_thw.tolist()
    videos = [] if media is None or media.video_grid_thw is None else media.video_grid_thw.tolist()
    unit = q.spatial_merge_size ** 2
    start, end = q.vision_start_token_id, q.vision_end_token_id
    n_img = n_vid = 0
    for part in parts:
        if part == "<image>":
            t, h, w = images[n_img]
            n_img += 1
            ids += [start] + [q.image_token_id] * (t * h * w // unit) + [end]
        elif part == "<video>":
            t, h, w = videos[n_vid]
            n_vid += 1
            if q.version != "qwen3_vl":  # Qwen2.5-VL: one run; time is in the positions
                ids += [start] + [q.video_token_id] * (t * h * w // unit) + [end]
                continue
            for k in range(t):  # Qwen3-VL: one run per temporal patch, after its time
                ids += encode(timestamp(k, q))
                ids += [start] + [q.video_token_id] * (h * w // unit) + [end]
        elif part:
            ids += encode(part)
    return ids
