"""Position tables of the Qwen-VL family, computed from the token ids and the media grids.

Grids are ``[n, 3]`` rows of (t, h, w) in *patches* (before the 2 x 2 merge), as the HF image and
video processors return them in ``image_grid_thw`` / ``video_grid_thw``. The patch rows of
``pixel_values`` come in merge-block order: for each frame, the 2 x 2 blocks row by row, and
inside a block its patches row by row; every table here follows that order.
"""

from __future__ import annotations

import torch

from megatron_copd.models.qwen_vl.spec import QwenVisionSpec


def _block_order(h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of the patches of one h x w frame, listed in merge-block order."""
    rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
    cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
    # [block_row, in_row, block_col, in_col] -> [block_row, block_col, in_row, in_col]
    return rows.permute(0, 2, 1, 3).reshape(-1), cols.permute(0, 2, 1, 3).reshape(-1)


def vision_rope_coords(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """[patches, 2] (row, col) of every patch: the 2-D RoPE coordinates inside the vision tower."""
    out = []
    for t, h, w in grid_thw.tolist():
        r, c = _block_order(h, w, merge)
        out.append(torch.stack([r, c], dim=-1).repeat(t, 1))
    return torch.cat(out)


def position_taps(
    grid_thw: torch.Tensor, side: int, merge: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear resampling (corners aligned) of a ``side x side`` learned position table to each
    frame's grid: ``indices [patches, 4]`` into the flattened table and their ``weights``."""
    idx, wts = [], []
    for t, h, w in grid_thw.tolist():
        r, c = _block_order(h, w, merge)
        (r0, r1), (wr0, wr1) = _axis_taps(r, h, side)
        (c0, c1), (wc0, wc1) = _axis_taps(c, w, side)
        i = torch.stack([r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1], -1)
        wt = torch.stack([wr0 * wc0, wr0 * wc1, wr1 * wc0, wr1 * wc1], -1)
        idx.append(i.repeat(t, 1))
        wts.append(wt.repeat(t, 1))
    return torch.cat(idx), torch.cat(wts)


def _axis_taps(pos: torch.Tensor, size: int, side: int):
    src = pos.to(torch.float32) * ((side - 1) / max(size - 1, 1))
    lo = src.floor()
    frac = src - lo
    lo = lo.long().clamp(0, side - 1)
    hi = (lo + 1).clamp(max=side - 1)
    return (lo, hi), (1 - frac, frac)


def frame_lengths(grid_thw: torch.Tensor) -> list[int]:
    """Patches per frame: vision attention never crosses a frame (nor an image)."""
    return [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]


def frame_segments(grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """The patch indices of every frame (full-attention layers attend inside each)."""
    out, start = [], 0
    for n in frame_lengths(grid_thw):
        out.append(torch.arange(start, start + n))
        start += n
    return out


def window_segments(grid_thw: torch.Tensor, merge: int, window: int) -> list[torch.Tensor]:
    """Qwen2.5-VL's attention windows: the patch indices of each ``window x window`` square of
    merged tokens of a frame (edge windows smaller), frame by frame, windows row by row.
    Patches of one merged token are consecutive (merge-block order), so a window is the union
    of its merged tokens' ``merge**2`` patches."""
    unit = merge * merge
    out, start = [], 0
    for t, h, w in grid_thw.tolist():
        hh, ww = h // merge, w // merge
        token = torch.arange(hh * ww).view(hh, ww)
        for _ in range(t):
            for r in range(0, hh, window):
                for c in range(0, ww, window):
                    ids = token[r:r + window, c:c + window].reshape(-1)
                    out.append(start + (ids[:, None] * unit + torch.arange(unit)).reshape(-1))
            start += hh * ww * unit
    return out


def video_frames(video_grid_thw: torch.Tensor | None) -> torch.Tensor | None:
    """Qwen3-VL writes each video frame as its own placeholder run (a timestamp before each), so
    a (t, h, w) video is t grids of (1, h, w) for the language model's positions."""
    if video_grid_thw is None:
        return None
    g = video_grid_thw.repeat_interleave(video_grid_thw[:, 0], dim=0).clone()
    g[:, 0] = 1
    return g


def mrope_position_ids(
    input_ids: torch.Tensor,
    spec: QwenVisionSpec,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    second_per_grid_ts: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D positions ``[3, b, s]`` and per-row ``deltas [b]`` for a (left-padded) batch.

    Text advances all three components together; a media block of (t, h, w) merged tokens starting
    at position p gets (p + k_i, p + h_i, p + w_i), and the text after it continues at
    p + max(h, w) (transformers' rule). k_i is the temporal index i, except for Qwen2.5-VL's
    videos, where it is ``int(i * tokens_per_second * seconds per temporal patch)``
    (``second_per_grid_ts``, one per video; default 1 s, as transformers). Qwen3-VL writes each
    video frame as its own block (t = 1). Images and videos are consumed in the order their
    placeholder runs appear, batch row by batch row (the order the processor lists their grids).
    Padding (``attention_mask`` 0) gets position 0. A token at index i >= len(row) (decoding) has
    position ``i + delta`` in all three components.
    """
    b, s = input_ids.shape
    merge = spec.spatial_merge_size
    per_frame = spec.version == "qwen3_vl"
    videos = video_frames(video_grid_thw) if per_frame else video_grid_thw
    queues = {
        spec.image_token_id: list(image_grid_thw.tolist()) if image_grid_thw is not None else [],
        spec.video_token_id: list(videos.tolist()) if videos is not None else [],
    }
    seconds = list(second_per_grid_ts) if second_per_grid_ts is not None else None
    used = {k: 0 for k in queues}
    pos = torch.zeros(3, b, s, dtype=torch.long)
    deltas = torch.zeros(b, dtype=torch.long)
    for row in range(b):
        keep = (attention_mask[row].bool() if attention_mask is not None
                else torch.ones(s, dtype=torch.bool))
        ids = input_ids[row][keep].tolist()
        p = torch.zeros(3, len(ids), dtype=torch.long)
        i, cur = 0, 0
        while i < len(ids):
            tok = ids[i]
            if tok in queues:
                kind = _kind(spec, tok)
                if used[tok] >= len(queues[tok]):
                    raise ValueError(f"row {row}: more {kind} placeholders than {kind} grids given")
                t, h, w = queues[tok][used[tok]]
                step = torch.tensor(1.0)
                if tok == spec.video_token_id and not per_frame:
                    # float32, as transformers computes it (its seconds: a float32 tensor)
                    sec = seconds[used[tok]] if seconds is not None else 1.0
                    step = torch.tensor(sec, dtype=torch.float32) * spec.tokens_per_second
                used[tok] += 1
                hh, ww = h // merge, w // merge
                n = t * hh * ww
                if ids[i:i + n] != [tok] * n:
                    raise ValueError(f"row {row}: the {kind} at token {i} needs {n} placeholder "
                                     f"tokens for grid {(t, h, w)}")
                frames = (torch.arange(t) * step).long()
                p[0, i:i + n] = cur + frames.repeat_interleave(hh * ww)
                p[1, i:i + n] = cur + torch.arange(hh).repeat_interleave(ww).repeat(t)
                p[2, i:i + n] = cur + torch.arange(ww).repeat(t * hh)
                cur += max(hh, ww)
                i += n
            else:
                j = i
                while j < len(ids) and ids[j] not in queues:
                    j += 1
                p[:, i:j] = cur + torch.arange(j - i)
                cur += j - i
                i = j
        pos[:, row, keep] = p
        deltas[row] = cur - len(ids)
    for tok, q in queues.items():
        if used[tok] != len(q):
            kind = _kind(spec, tok)
            raise ValueError(f"{len(q)} {kind} grids given but {used[tok]} {kind} placeholder "
                             "runs found in the tokens")
    return pos, deltas


def _kind(spec: QwenVisionSpec, tok: int) -> str:
    if tok == spec.image_token_id:
        return "image"
    return "video frame" if spec.version == "qwen3_vl" else "video"
