"""Qwen-VL videos as transformers processes them: a video file or a frame list becomes the
frames, patch rows and grid transformers' own video processor (built from the exported
``video_preprocessor_config.json``) makes of it, with Qwen3-VL's timestamps and Qwen2.5-VL's
seconds per temporal patch as transformers' processors compute them; the seconds cross
branches with the prompt; the processor files beside a tokenizer must normalise as the
model's version does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("torchvision")
av = pytest.importorskip("av")

from megatron_copd.config import QwenVLConfig  # noqa: E402
from megatron_copd.data.prompting import encode_prompt  # noqa: E402
from megatron_copd.errors import DataError  # noqa: E402
from megatron_copd.models.qwen_vl import processing  # noqa: E402
from megatron_copd.models.qwen_vl.media import QwenVisualInputs  # noqa: E402

START, END, IMG, VID = 5, 6, 7, 8


def _q(version: str, **kw) -> QwenVLConfig:
    patch = 16 if version == "qwen3_vl" else 14
    extra = {} if version == "qwen3_vl" else {"mrope_interleaved": False}
    base = dict(version=version, patch_size=patch, num_position_embeddings=16,
                vision_start_token_id=START, vision_end_token_id=END, image_token_id=IMG,
                video_token_id=VID, max_frames=8, video_min_pixels=4096,
                video_max_pixels=8 * 64 * 64, **extra)
    return QwenVLConfig(**{**base, **kw})


class _Tok:
    """Characters as ids (100 + ord % 100); Qwen's vision tokens as the ids above."""

    bos_id, eos_id, pad_id = 1, 2, 3
    image_token_id = None

    def encode(self, text):
        return [100 + ord(c) % 100 for c in text]


def _frames(n: int, w: int = 96, h: int = 72) -> np.ndarray:
    """``n`` smooth frames (a moving gradient, so the codec keeps them close)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([np.stack([(x * 2 + 9 * i) % 256, (y * 3 + 5 * i) % 256,
                               np.full_like(x, 20 * i % 256)], -1) for i in range(n)]
                    ).astype(np.uint8)


def _mp4(path, frames: np.ndarray, fps: int):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def _decoded(path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as c:
        rate = float(c.streams.video[0].average_rate)
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]), rate


def _hf_video_processor(q: QwenVLConfig, tmp_path):
    """The video processor a transformers user gets from the export's processor file."""
    from transformers import AutoVideoProcessor

    d = tmp_path / f"hf_{q.version}"
    d.mkdir()
    (d / processing.VIDEO_PROCESSOR_FILE).write_text(
        json.dumps(processing.video_processor_config(q)))
    return AutoVideoProcessor.from_pretrained(str(d))


def _hf_timestamps(indices, fps, tps):
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    return Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, tps)


def _video_run(ids: list[int], q: QwenVLConfig, tok: _Tok, grid, times) -> list[int]:
    t, h, w = grid
    n = h * w // q.spatial_merge_size ** 2
    if q.version != "qwen3_vl":
        return [START] + [VID] * (t * n) + [END]
    out = []
    for k in range(t):
        out += tok.encode(f"<{times[k]:.1f} seconds>") + [START] + [VID] * n + [END]
    return out


@pytest.mark.parametrize("version", ["qwen3_vl", "qwen2_5_vl"])
def test_video_file_as_transformers_processes_it(tmp_path, version):
    """25 frames at 10 fps (2.5 s): sampled at 2 fps, resized by the video budget, patched and
    normalised as transformers' video processor does it; Qwen3-VL's prompt carries
    transformers' timestamps, Qwen2.5-VL's media its seconds per temporal patch."""
    q = _q(version)
    path = _mp4(tmp_path / "clip.mp4", _frames(25), fps=10)
    tok = _Tok()
    enc = encode_prompt({"id": "v1", "prompt": "see <video> now", "video": path}, tok, q, 4096)
    m = enc.pixels

    from transformers.video_utils import VideoMetadata

    frames, fps = _decoded(path)
    hf = _hf_video_processor(q, tmp_path)
    out = hf(videos=[frames], video_metadata=[VideoMetadata(total_num_frames=len(frames),
                                                            fps=fps)],
             return_metadata=True, return_tensors="pt")
    meta = out["video_metadata"][0]
    assert len(meta.frames_indices) >= 4  # 2 fps over 2.5 s, at least min_frames
    assert torch.equal(m.video_grid_thw, out["video_grid_thw"])
    assert m.pixel_values_videos.shape == out["pixel_values_videos"].shape
    assert torch.allclose(m.pixel_values_videos, out["pixel_values_videos"], atol=1e-6)
    times = _hf_timestamps(meta.frames_indices, fps, q.temporal_patch_size)
    grid = m.video_grid_thw[0].tolist()
    want = ([tok.bos_id] + tok.encode("see ") + _video_run([], q, tok, grid, times)
            + tok.encode(" now"))
    assert enc.token_ids == want
    if version == "qwen3_vl":
        assert m.second_per_grid_ts is None
        assert times[0] > 0  # the mean time of the first temporal patch's frames
    else:  # transformers' Qwen2.5-VL processor: temporal_patch_size / sampled fps
        assert m.second_per_grid_ts.tolist() == pytest.approx(
            [q.temporal_patch_size / meta.sampled_fps])


def test_frame_list_is_taken_as_sampled_at_video_fps(tmp_path):
    """Five frame files at video_fps = 2: all kept, timestamps 0.25 / 1.25 / 2.0 s (the last
    frame repeated to fill the third temporal patch), as transformers computes them; more
    frames than max_frames are spread evenly and keep their times."""
    q = _q("qwen3_vl", max_frames=4)
    paths = []
    for i, f in enumerate(_frames(9, 64, 64)):
        paths.append(str(tmp_path / f"f{i}.png"))
        Image.fromarray(f).save(paths[-1])
    five = processing.sample_indices(5, q.video_fps, _q("qwen3_vl"))
    assert five == [0, 1, 2, 3, 4]
    assert processing.frame_times(five, 2.0, 2) == _hf_timestamps(five, 2.0, 2) == [0.25, 1.25,
                                                                                    2.0]
    tok = _Tok()
    enc = encode_prompt({"id": "v2", "prompt": "<video> ?", "video": paths}, tok, q, 4096)
    picked = processing.sample_indices(9, q.video_fps, q)
    assert picked == [0, 3, 5, 8]  # evenly over 9 frames, first and last included
    times = _hf_timestamps(picked, 2.0, 2)
    assert times == [0.75, 3.25]
    grid = enc.pixels.video_grid_thw[0].tolist()
    assert grid[0] == 2
    assert enc.token_ids == ([tok.bos_id] + _video_run([], q, tok, grid, times)
                             + tok.encode(" ?"))
    # The frames are those files, in that order.
    from transformers.video_utils import VideoMetadata

    hf = processing.video_processor(q)(videos=[_frames(9, 64, 64)[picked]], return_tensors="pt",
                                       video_metadata=[VideoMetadata(total_num_frames=9,
                                                                     fps=2.0)])
    assert torch.equal(enc.pixels.pixel_values_videos, hf["pixel_values_videos"])


def test_seconds_cross_branches_with_the_prompt():
    """The wire form of a student's rollouts (grids, then the seconds as float32 bits) gives
    the teacher the same media."""
    from megatron_copd.rollout.exchange import _Request
    from megatron_copd.rollout.generation import Rollout

    media = QwenVisualInputs(torch.randn(24, 12), torch.tensor([[1, 4, 6]]),
                             torch.randn(32, 12), torch.tensor([[2, 4, 4]]),
                             torch.tensor([1.25], dtype=torch.float64))
    tokens = torch.tensor([[11, 12, 2], [13, 2, 3]])
    ro = Rollout(prompts=[[5, 7, 6, 8, 9]], prompt_index=torch.tensor([0, 0]), tokens=tokens,
                 lengths=torch.tensor([3, 2]), logprobs=torch.zeros(2, 3),
                 sampling_logprobs=torch.zeros(2, 3), finished=torch.ones(2, dtype=torch.bool),
                 pixels=media)
    req = _Request.from_rollout(ro, torch.device("cpu"))
    assert req.ints.numel() == _Request.ints_size(req.header)
    got = req.media()
    for field in QwenVisualInputs.FIELDS:
        assert torch.equal(getattr(got, field), getattr(media, field)), field
    assert req.unpack()[2] == [[11, 12, 2], [13, 2]]
    # Without seconds (Qwen3-VL) nothing extra travels.
    media.second_per_grid_ts = None
    plain = _Request.from_rollout(ro, torch.device("cpu"))
    assert plain.ints.numel() == req.ints.numel() - 1 and plain.media().second_per_grid_ts is None


def test_select_and_cat_keep_each_videos_seconds():
    a = QwenVisualInputs(None, None, torch.zeros(16, 4), torch.tensor([[1, 4, 4]]),
                         torch.tensor([0.5], dtype=torch.float64))
    b = QwenVisualInputs(None, None, torch.ones(8, 4), torch.tensor([[2, 2, 2]]))
    both = QwenVisualInputs.cat([a, b])
    assert both.second_per_grid_ts.tolist() == [0.5, 1.0]  # b gave none: 1 s
    from megatron_copd.models.qwen_vl.spec import QwenVisionSpec

    spec = QwenVisionSpec(depth=1, hidden_size=32, num_heads=2, intermediate_size=64,
                          out_hidden_size=64, patch_size=8, image_token_id=IMG,
                          video_token_id=VID, vision_start_token_id=START,
                          vision_end_token_id=END)
    counts = both.per_sequence([[VID] * 4, [VID] * 2], spec)
    second = both.select(counts, [1])
    assert second.second_per_grid_ts.tolist() == [1.0] and torch.equal(
        second.pixel_values_videos, torch.ones(8, 4))


def test_processor_files_must_normalise_as_the_version_does(tmp_path):
    q = _q("qwen2_5_vl")
    cfg = processing.processor_config(q)
    assert cfg["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])  # CLIP's
    (tmp_path / processing.PROCESSOR_FILE).write_text(json.dumps(cfg))
    (tmp_path / processing.VIDEO_PROCESSOR_FILE).write_text(
        json.dumps(processing.video_processor_config(q)))
    processing.check_processor_dir(tmp_path, q)  # the export's own files pass
    (tmp_path / processing.VIDEO_PROCESSOR_FILE).write_text(
        json.dumps({**processing.video_processor_config(q), "image_mean": [0.5, 0.5, 0.5]}))
    with pytest.raises(DataError, match=r"video_preprocessor_config.json: image_mean=\[0.5, 0.5, "
                                        r"0.5\] is not the normalisation of model.qwen_vl.version "
                                        r"qwen2_5_vl"):
        processing.check_processor_dir(tmp_path, q)


def test_exported_image_processor_equals_ours(tmp_path):
    """What a transformers user loads from the export processes an image as training did."""
    from transformers import AutoImageProcessor

    for version in ("qwen3_vl", "qwen2_5_vl"):
        q = _q(version, min_pixels=1024, max_pixels=64 * 64)
        d = tmp_path / version
        d.mkdir()
        (d / processing.PROCESSOR_FILE).write_text(json.dumps(processing.processor_config(q)))
        img = Image.fromarray(_frames(1, 60, 44)[0])
        theirs = AutoImageProcessor.from_pretrained(str(d))(images=[img], return_tensors="pt")
        ours = processing.image_processor(q)(images=[img], return_tensors="pt")
        assert torch.equal(theirs["image_grid_thw"], ours["image_grid_thw"])
        assert torch.allclose(theirs["pixel_values"], ours["pixel_values"], atol=1e-5)


def test_video_without_torchvision_is_one_line_naming_the_record(tmp_path, monkeypatch):
    import transformers.utils

    path = _mp4(tmp_path / "clip.mp4", _frames(4), fps=2)
    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: False)
    processing._video_processor.cache_clear()
    try:
        with pytest.raises(DataError, match=r"^record v3: video: Qwen-VL videos go through "
                                            r"transformers' video processor, which needs "
                                            r"transformers and torchvision; install"):
            encode_prompt({"id": "v3", "prompt": "<video>", "video": path}, _Tok(),
                          _q("qwen3_vl"), 4096)
    finally:
        processing._video_processor.cache_clear()


@pytest.mark.parametrize("version", ["qwen3_vl", "qwen2_5_vl"])
def test_a_one_frame_video(tmp_path, version):
    """One frame: kept and repeated to fill the temporal patch (the processor's own padding)."""
    path = tmp_path / "f0.png"
    Image.fromarray(_frames(1, 64, 64)[0]).save(path)
    q = _q(version)
    enc = encode_prompt({"id": "v4", "prompt": "<video> ?", "video": [str(path)]}, _Tok(), q, 4096)
    assert enc.pixels.video_grid_thw[0, 0] == 1
