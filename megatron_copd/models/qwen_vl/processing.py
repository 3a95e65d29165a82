"""Prompt records -> a Qwen-VL model's inputs: token ids with the vision tokens of Qwen's chat
template, images through transformers' Qwen2-VL image processor (the one Qwen3-VL uses too) and
videos through transformers' video processor of the model's version (Qwen3-VL's, or Qwen2-VL's
for Qwen2.5-VL), both built from ``model.qwen_vl`` (no hub) with the normalisation the version's
published checkpoints use.

Token layout of an image: ``<|vision_start|> <|image_pad|> x n <|vision_end|>`` with
``n = t * h * w / merge^2`` for its (t, h, w) patch grid, the expanded form the model takes.
Placement follows the project's prompt rules (``data.prompting``): ``<image>`` in the prompt text
takes the next image, a prompt without placeholders gets its images first.

A video is a file (frames sampled at ``video_fps`` by the video processor's own rule) or a list
of frame files (taken as sampled at ``video_fps``). Qwen3-VL writes ``<t seconds>`` before each
temporal patch, t the mean time of its frames (transformers' Qwen3VLProcessor); Qwen2.5-VL
advances its temporal positions by the seconds a temporal patch spans (``second_per_grid_ts``).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import numpy as np
from PIL import Image, UnidentifiedImageError

from megatron_copd.config import QwenVLConfig
from megatron_copd.data.media import IMAGE_MEAN as CLIP_MEAN
from megatron_copd.data.media import IMAGE_STD as CLIP_STD
from megatron_copd.data.media import MULTIMODAL_HINT
from megatron_copd.errors import DataError
from megatron_copd.models.qwen_vl.media import QwenVisualInputs

# The normalisation of each version's published processors: Qwen3-VL 0.5 / 0.5, Qwen2.5-VL
# CLIP's statistics.
STATS = {"qwen3_vl": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "qwen2_5_vl": (CLIP_MEAN, CLIP_STD)}
PROCESSOR_FILE = "preprocessor_config.json"
VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"
# Processor fields that must agree with the checkpoint's vision tower.
_MATCH = {"patch_size": "patch_size", "temporal_patch_size": "temporal_patch_size",
          "merge_size": "spatial_merge_size"}


def image_processor(q: QwenVLConfig):
    """transformers' PIL Qwen2-VL image processor with this model's patch sizes and budget."""
    return _processor(q.version, q.patch_size, q.temporal_patch_size, q.spatial_merge_size,
                      q.min_pixels, q.max_pixels)


@functools.lru_cache(maxsize=8)
def _processor(version: str, patch: int, temporal: int, merge: int, min_pixels: int,
               max_pixels: int):
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )
    except ImportError:
        raise DataError("Qwen-VL images need transformers' image processor: pip install "
                        "'megatron-copd[hf]'") from None
    mean, std = STATS[version]
    return Qwen2VLImageProcessorPil(
        patch_size=patch, temporal_patch_size=temporal, merge_size=merge,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        image_mean=list(mean), image_std=list(std))


def video_processor(q: QwenVLConfig):
    """transformers' video processor of this model's version, with its patch sizes, video pixel
    budget, sampling rate and frame limit (frames are sampled here: ``do_sample_frames`` off)."""
    return _video_processor(q.version, q.patch_size, q.temporal_patch_size,
                            q.spatial_merge_size, q.video_min_pixels, q.video_max_pixels,
                            q.video_fps, q.max_frames)


@functools.lru_cache(maxsize=8)
def _video_processor(version: str, patch: int, temporal: int, merge: int, min_pixels: int,
                     max_pixels: int, fps: float, max_frames: int):
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        raise DataError("Qwen-VL videos go through transformers' video processor, which needs "
                        f"transformers and torchvision; {MULTIMODAL_HINT}")
    if version == "qwen3_vl":
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
            Qwen3VLVideoProcessor as cls,
        )
    else:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
            Qwen2VLVideoProcessor as cls,
        )
    return cls(**_video_settings(version, patch, temporal, merge, min_pixels, max_pixels, fps,
                                 max_frames), do_sample_frames=False)


def _video_settings(version, patch, temporal, merge, min_pixels, max_pixels, fps, max_frames
                    ) -> dict:
    mean, std = STATS[version]
    # cap_pixels_per_frame false: transformers 5.x's default rule (it warns when unset)
    return {"patch_size": patch, "temporal_patch_size": temporal, "merge_size": merge,
            "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
            "image_mean": list(mean), "image_std": list(std), "fps": float(fps),
            "max_frames": max_frames, "cap_pixels_per_frame": False}


def processor_config(q: QwenVLConfig) -> dict:
    """``preprocessor_config.json`` of :func:`image_processor` (written by the HF export)."""
    mean, std = STATS[q.version]
    return {"image_processor_type": "Qwen2VLImageProcessor", "do_resize": True,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "do_convert_rgb": True, "image_mean": list(mean), "image_std": list(std),
            "patch_size": q.patch_size, "temporal_patch_size": q.temporal_patch_size,
            "merge_size": q.spatial_merge_size,
            "size": {"shortest_edge": q.min_pixels, "longest_edge": q.max_pixels}}


def video_processor_config(q: QwenVLConfig) -> dict:
    """``video_preprocessor_config.json`` of :func:`video_processor` (written by the HF export):
    frames sampled from a file at ``video_fps``, as this project samples them."""
    name = "Qwen3VLVideoProcessor" if q.version == "qwen3_vl" else "Qwen2VLVideoProcessor"
    return {"video_processor_type": name, "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "do_sample_frames": True, "resample": 3,
            **_video_settings(q.version, q.patch_size, q.temporal_patch_size,
                              q.spatial_merge_size, q.video_min_pixels, q.video_max_pixels,
                              q.video_fps, q.max_frames)}


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
    """The processor files beside a tokenizer (e.g. those imported with a Qwen-VL checkpoint)
    must patch and normalise images and videos the way this run feeds the vision tower."""
    mean, std = STATS[q.version]
    for name in (PROCESSOR_FILE, VIDEO_PROCESSOR_FILE):
        path = Path(d) / name
        if not path.is_file():
            continue
        cfg = json.loads(path.read_text())
        for theirs, ours in _MATCH.items():
            if theirs in cfg and int(cfg[theirs]) != getattr(q, ours):
                raise DataError(f"{path}: {theirs}={cfg[theirs]} does not match the "
                                f"checkpoint's model.qwen_vl.{ours}={getattr(q, ours)}")
        for key, want in (("image_mean", mean), ("image_std", std)):
            got = cfg.get(key)
            if got is not None and (len(got) != 3 or any(abs(float(a) - b) > 1e-6
                                                        for a, b in zip(got, want))):
                raise DataError(f"{path}: {key}={got} is not the normalisation of "
                                f"model.qwen_vl.version {q.version} ({list(want)})")


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


@dataclass
class Clip:
    """The frames taken from one video and where they sit in it."""

    frames: list[Image.Image]
    indices: list[int]  # their frame numbers in the video
    total: int  # frames in the video
    fps: float  # the video's frame rate


def sample_indices(total: int, fps: float, q: QwenVLConfig) -> list[int]:
    """Frame numbers to take from a video of ``total`` frames at ``fps``: the video processor's
    own rule (``video_fps`` frames per second, at most ``max_frames``)."""
    from transformers.video_utils import VideoMetadata

    if total < q.temporal_patch_size:  # too short to sample (Qwen2-VL's rule divides by 0)
        return list(range(total))
    picked = video_processor(q).sample_frames(VideoMetadata(total_num_frames=total, fps=fps),
                                              fps=q.video_fps)
    return [int(i) for i in picked]


def encode_video(clip: Clip, q: QwenVLConfig, fail) -> tuple[QwenVisualInputs, list[float]]:
    """One video -> its patch rows, (t, h, w) grid (and, for Qwen2.5-VL, the seconds a temporal
    patch spans), and the time in seconds of each temporal patch (Qwen3-VL's timestamps).

    The frames go through transformers' video processor: its resize by the video pixel
    budget, normalisation, patch order; a frame count that is not a multiple of
    temporal_patch_size repeats the last frame."""
    frames = [check_budget(f, "video", q, fail) for f in clip.frames]
    if len({f.size for f in frames}) > 1:
        raise fail("video: its frames differ in size")
    tps = q.temporal_patch_size
    frames += [frames[-1]] * (tps - len(frames))  # transformers' resize needs >= tps frames
    video = np.stack([np.asarray(f.convert("RGB")) for f in frames])  # [T, H, W, 3]
    out = video_processor(q)(videos=[video], return_tensors="pt")
    inputs = QwenVisualInputs(pixel_values_videos=out["pixel_values_videos"].float(),
                              video_grid_thw=out["video_grid_thw"].long())
    if q.version != "qwen3_vl":  # transformers' Qwen2.5-VL processor: tps / sampled fps
        sampled_fps = len(clip.indices) / clip.total * clip.fps
        inputs.second_per_grid_ts = torch.tensor([tps / sampled_fps], dtype=torch.float64)
    return inputs, frame_times(clip.indices, clip.fps, tps)


def frame_times(indices: list[int], fps: float, tps: int) -> list[float]:
    """Seconds of each temporal patch: the mean time of its first and last frame, the last
    frame repeated to fill the final patch (transformers' Qwen3VLProcessor)."""
    idx = list(indices) + [indices[-1]] * (-len(indices) % tps)
    t = [i / fps for i in idx]
    return [(t[k] + t[k + tps - 1]) / 2 for k in range(0, len(t), tps)]


def prompt_ids(parts: list[str], media: QwenVisualInputs | None, q: QwenVLConfig,
               encode, bos: int | None, video_times: list[list[float]] | None = None
               ) -> list[int]:
    """Token ids of the prompt ``parts`` (text, ``<image>`` and ``<video>`` markers, in order);
    ``video_times``: each video's temporal-patch times (:func:`encode_video`; Qwen3-VL)."""
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
            times = video_times[n_vid - 1]
            for k in range(t):  # Qwen3-VL: one run per temporal patch, after its time
                ids += encode(f"<{times[k]:.1f} seconds>")
                ids += [start] + [q.video_token_id] * (h * w // unit) + [end]
        elif part:
            ids += encode(part)
    return ids
