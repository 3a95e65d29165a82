"""Image and video loading for prompts: Pillow for images and frame files, PyAV for video files.

Every picture becomes a float tensor ``[3, S, S]`` with ``S = vision.image_size``: converted to
RGB, resized to S x S (bicubic; the aspect ratio is not kept, matching the square ViT input),
scaled to [0, 1] and normalised per channel with the CLIP mean/std below, the statistics that
CLIP-style towers (CLIP, LLaVA, Qwen-VL) are trained with, so imported vision weights see the
inputs they expect. A video is a list of frame image files or one video file; ``max_frames``
frames are taken evenly spaced, first and last included.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from megatron_copd.errors import DataError

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
MULTIMODAL_HINT = "install the multimodal extra: pip install 'megatron-copd[multimodal]'"


def to_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """A Pillow image -> normalised ``[3, image_size, image_size]`` float32 tensor."""
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    arr = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, 3]
    arr = (arr - np.asarray(IMAGE_MEAN, dtype=np.float32)) / np.asarray(IMAGE_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def load_image(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """Read an image file (PNG, JPEG, ...) -> ``[3, image_size, image_size]``."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_tensor(img, image_size)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read image: {e}") from None


def sample_frame_indices(n_frames: int, max_frames: int) -> list[int]:
    """``min(n_frames, max_frames)`` indices spread evenly over ``range(n_frames)``."""
    if n_frames <= max_frames:
        return list(range(n_frames))
    return [int(i) for i in np.linspace(0, n_frames - 1, max_frames).round()]


def load_video(
    video: list[str] | str,
    image_size: int,
    max_frames: int,
    base_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Frame files or a video file -> ``[n, 3, image_size, image_size]``, n <= max_frames."""
    if isinstance(video, str):
        frames = _decode_video_file(_resolve(video, base_dir), image_size, max_frames)
        return torch.stack([to_tensor(f, image_size) for f in frames])
    if not video:
        raise DataError("video: empty frame list")
    idx = sample_frame_indices(len(video), max_frames)
    return torch.stack([load_image(_resolve(video[i], base_dir), image_size) for i in idx])


def _resolve(path: str, base_dir: str | os.PathLike | None) -> Path:
    p = Path(path)
    return p if base_dir is None or p.is_absolute() else Path(base_dir) / p


def _decode_video_file(path: Path, image_size: int | None, max_frames: int) -> list[Image.Image]:
    """Evenly sampled frames of a video file, resized to ``image_size`` squared (None: as
    they are)."""
    frames, _, _, _ = read_video(path, lambda n, fps: sample_frame_indices(n, max_frames),
                                 image_size)
    return frames


def read_video(path: Path, choose, image_size: int | None = None
               ) -> tuple[list[Image.Image], list[int], int, float | None]:
    """The frames ``choose(n_frames, fps)`` picks from a video file -> (frames, their indices,
    n_frames, fps; fps None when the file does not say). Two passes (count, then convert only
    the chosen frames), so a long video never holds more than those pictures in memory."""
    if not path.is_file():
        raise DataError(f"{path}: video file not found")
    try:
        import av
    except ImportError:
        raise DataError(
            f"{path}: decoding video files needs PyAV; {MULTIMODAL_HINT} "
            f"(or give the video as a list of frame images)"
        ) from None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else None
            n = sum(1 for _ in container.decode(video=0))
        if not n:
            raise DataError(f"{path}: video has no frames")
        indices = [int(i) for i in choose(n, fps)]
        keep = set(indices)
        frames = {}
        with av.open(str(path)) as container:
            for i, f in enumerate(container.decode(video=0)):
                if i in keep:
                    img = f.to_image().convert("RGB")
                    if image_size is not None:
                        img = img.resize((image_size, image_size), Image.BICUBIC)
                    frames[i] = img
    except (av.FFmpegError, ValueError, OSError, IndexError) as e:
        raise DataError(f"{path}: cannot decode video: {e}") from None
    return [frames[i] for i in indices], indices, n, fps
