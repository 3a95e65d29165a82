"""Prompt records -> model inputs: token ids with expanded image placeholders, and pixels.

Token layout of one prompt: ``[BOS] ... text ... <img x T> ... text ...`` where every image (and
every sampled video frame) is ``T = vision.tokens_per_image`` consecutive ``image_token_id``
tokens, the layout ``models/vlm.py`` expects. Placement:

- each ``<image>`` in the prompt text is replaced by the next image of ``record.images``;
- ``<video>`` (at most one) is replaced by all sampled frames of ``record.video``;
- a prompt without either placeholder gets all images, then the video frames, before the text.

``pixels`` holds the pictures in the order their placeholders appear. :func:`collate` pads a batch
on the left (the rollout/training layout in docs/ARCHITECTURE.md) and concatenates pixels
batch-major, which is the order ``CopdModel.embed`` fills placeholders in.

The model's answer is ``encode_response(answer)``: the answer text followed by EOS.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_copd.config import QwenVLConfig, VisionConfig
from megatron_copd.data import media
from megatron_copd.data.tokenizer import Tokenizer
from megatron_copd.errors import DataError
from megatron_copd.models.qwen_vl import processing as qwen_processing
from megatron_copd.models.qwen_vl.media import QwenVisualInputs

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_SPLIT = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


@dataclass
class EncodedPrompt:
    token_ids: list[int]
    pixels: torch.Tensor | QwenVisualInputs | None
    """``[n_images, 3, H, W]`` normalised, in placeholder order (a Qwen-VL model: the image
    processor's patch rows and grids); None for a text-only prompt."""
    record: Any

    @property
    def num_images(self) -> int:
        if isinstance(self.pixels, QwenVisualInputs):
            return len(self.pixels.image_grid_thw)
        return 0 if self.pixels is None else int(self.pixels.shape[0])


@dataclass
class PromptBatch:
    tokens: torch.Tensor
    """``[B, T]`` int64, left-padded with the tokenizer's pad id."""
    lengths: torch.Tensor
    """``[B]`` int64: real (non-pad) tokens per row; row b's prompt is ``tokens[b, T-len:]``."""
    pixels: torch.Tensor | None
    """``[sum of images, 3, H, W]``: sample 0's images, then sample 1's, ...; None if no images."""
    images_per_sample: list[int]

    @property
    def pad_mask(self) -> torch.Tensor:
        """``[B, T]`` bool, True at left-padding positions."""
        t = self.tokens.shape[1]
        return torch.arange(t).unsqueeze(0) < (t - self.lengths).unsqueeze(1)


def _get(record: Any, name: str, default: Any = None) -> Any:
    if isinstance(record, dict):
        return record.get(name, default)
    return getattr(record, name, default)


def encode_prompt(
    record: Any,
    tokenizer: Tokenizer,
    vision: VisionConfig | QwenVLConfig | None,
    max_prompt_tokens: int,
    base_dir: str | os.PathLike | None = None,
) -> EncodedPrompt:
    """Encode one prompt record (a PromptRecord or a dict with the same fields).

    ``vision``: the model's vision side (``ModelConfig.vision_side``): a CLIP-style tower, a
    Qwen-VL one (``models.qwen_vl.processing``: native resolution, its chat-template tokens), or
    None for a text-only model.

    ``base_dir`` resolves relative media paths (records loaded from a file usually carry paths
    already resolved against the file's directory). Errors are one-line DataErrors naming the
    record id.
    """
    rid = _get(record, "id", "?")
    prompt = _get(record, "prompt")
    images = list(_get(record, "images") or [])
    video = _get(record, "video") or None

    def fail(msg: str) -> DataError:
        return DataError(f"record {rid}: {msg}")

    if not isinstance(prompt, str) or not prompt.strip():
        raise fail("prompt: expected non-empty text")
    parts = _SPLIT.split(prompt)
    n_image_ph = parts.count(IMAGE_PLACEHOLDER)
    n_video_ph = parts.count(VIDEO_PLACEHOLDER)
    if n_image_ph or n_video_ph:
        if n_image_ph != len(images):
            raise fail(
                f"prompt has {n_image_ph} {IMAGE_PLACEHOLDER} placeholder(s) but the "
                f"record has {len(images)} image(s)"
            )
        if n_video_ph != (1 if video else 0):
            raise fail(
                f"prompt has {n_video_ph} {VIDEO_PLACEHOLDER} placeholder(s) but the "
                f"record has {'a video' if video else 'no video'}"
            )
    else:
        parts = (
            [IMAGE_PLACEHOLDER] * len(images) + ([VIDEO_PLACEHOLDER] if video else []) + [prompt]
        )
    if (images or video) and vision is None:
        raise fail(
            f"has {len(images)} image(s){' and a video' if video else ''} but the model "
            f"has no vision encoder (model.vision is null)"
        )
    if isinstance(vision, QwenVLConfig):
        return _encode_qwen_vl(record, parts, images, video, tokenizer, vision,
                               max_prompt_tokens, base_dir, fail)
    if (images or video) and tokenizer.image_token_id is None:
        raise fail("has images but the tokenizer has no image placeholder token")

    # Video files must be decoded to know their frame count; frame lists are sampled lazily.
    video_pixels = None
    if isinstance(video, str):
        video_pixels = _load(
            fail, "video", media.load_video, video, vision.image_size, vision.max_frames, base_dir
        )
        n_frames = video_pixels.shape[0]
    elif video:
        n_frames = len(media.sample_frame_indices(len(video), vision.max_frames))
    else:
        n_frames = 0

    ids: list[int] = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    order: list[str] = []  # "image" / "video", in placeholder order
    for part in parts:
        if part == IMAGE_PLACEHOLDER:
            ids += [tokenizer.image_token_id] * vision.tokens_per_image
            order.append("image")
        elif part == VIDEO_PLACEHOLDER:
            ids += [tokenizer.image_token_id] * (vision.tokens_per_image * n_frames)
            order.append("video")
        elif part:
            text_ids = tokenizer.encode(part)
            if tokenizer.image_token_id is not None and tokenizer.image_token_id in text_ids:
                raise fail(
                    f"prompt: contains the tokenizer's image token "
                    f"{tokenizer.image_token!r} as text; use {IMAGE_PLACEHOLDER}"
                )
            ids += text_ids
    if len(ids) > max_prompt_tokens:
        n_visual = (len(images) + n_frames) * (vision.tokens_per_image if vision else 0)
        raise fail(
            f"prompt: {len(ids)} tokens (incl. {n_visual} image tokens) exceed "
            f"max_prompt_tokens={max_prompt_tokens}"
        )

    pictures: list[torch.Tensor] = []
    next_image = 0
    for kind in order:
        if kind == "image":
            i = next_image
            next_image += 1
            pictures.append(
                _load(
                    fail,
                    f"images[{i}]",
                    media.load_image,
                    media._resolve(images[i], base_dir),
                    vision.image_size,
                )[None]
            )
        else:
            if video_pixels is None:
                video_pixels = _load(
                    fail,
                    "video",
                    media.load_video,
                    video,
                    vision.image_size,
                    vision.max_frames,
                    base_dir,
                )
            pictures.append(video_pixels)
    pixels = torch.cat(pictures) if pictures else None
    return EncodedPrompt(token_ids=ids, pixels=pixels, record=record)


def _encode_qwen_vl(record, parts, images, video, tokenizer: Tokenizer, q: QwenVLConfig,
                    max_prompt_tokens: int, base_dir, fail) -> EncodedPrompt:
    pics = qwen_processing.encode_images([media._resolve(p, base_dir) for p in images], q, fail)
    times = None
    if video:
        _load(fail, "video", qwen_processing.video_processor, q)  # torchvision there?
        clip, times = qwen_processing.encode_video(_qwen_clip(video, q, base_dir, fail), q, fail)
        pics = clip if pics is None else QwenVisualInputs.cat([pics, clip])
        times = [times]
    media_ids = {q.image_token_id, q.video_token_id, q.vision_start_token_id,
                 q.vision_end_token_id}

    def encode(text: str) -> list[int]:
        ids = tokenizer.encode(text)
        if media_ids.intersection(ids):
            raise fail(f"prompt: contains a vision token of the tokenizer as text; use "
                       f"{IMAGE_PLACEHOLDER}")
        return ids

    ids = qwen_processing.prompt_ids(parts, pics, q, encode, tokenizer.bos_id, times)
    if len(ids) > max_prompt_tokens:
        n_visual = sum(1 for t in ids if t == q.image_token_id)
        raise fail(f"prompt: {len(ids)} tokens (incl. {n_visual} image tokens) exceed "
                   f"max_prompt_tokens={max_prompt_tokens}")
    return EncodedPrompt(token_ids=ids, pixels=pics, record=record)


def _qwen_clip(video, q: QwenVLConfig, base_dir, fail) -> qwen_processing.Clip:
    """A record's video as the frames the video processor's sampling picks: from a file at
    its own frame rate, from a frame list taken as sampled at ``model.qwen_vl.video_fps``."""
    if isinstance(video, str):
        def choose(n, fps):
            return qwen_processing.sample_indices(n, fps or q.video_fps, q)

        frames, idx, total, fps = _load(fail, "video", media.read_video,
                                        media._resolve(video, base_dir), choose)
        return qwen_processing.Clip(frames, idx, total, fps or q.video_fps)
    idx = qwen_processing.sample_indices(len(video), q.video_fps, q)
    frames = [qwen_processing.open_image(media._resolve(video[i], base_dir), f"video[{i}]", q,
                                         fail) for i in idx]
    return qwen_processing.Clip(frames, idx, len(video), q.video_fps)


def _load(fail, field: str, fn, *args):
    try:
        return fn(*args)
    except DataError as e:
        raise fail(f"{field}: {e}") from None


def encode_response(answer: str, tokenizer: Tokenizer) -> list[int]:
    """Target token ids of a response: the answer text then EOS (what warm-up trains on)."""
    return tokenizer.encode(answer) + [tokenizer.eos_id]


def collate(prompts: Sequence[EncodedPrompt], pad_id: int) -> PromptBatch:
    """Left-pad token ids to the longest prompt and concatenate pixels batch-major."""
    if not prompts:
        raise ValueError("collate: empty batch")
    lengths = [len(p.token_ids) for p in prompts]
    t = max(lengths)
    tokens = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, t - len(p.token_ids) :] = torch.tensor(p.token_ids, dtype=torch.long)
    pics = [p.pixels for p in prompts if p.pixels is not None and p.pixels.shape[0] > 0]
    return PromptBatch(
        tokens=tokens,
        lengths=torch.tensor(lengths, dtype=torch.long),
        pixels=torch.cat(pics) if pics else None,
        images_per_sample=[p.num_images for p in prompts],
    )
