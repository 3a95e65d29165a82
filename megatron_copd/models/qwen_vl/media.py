"""The media of a batch for a Qwen-VL model, as the HF image / video processors return them, and
the per-sequence bookkeeping rollout needs (which images and videos belong to which sequence).

Images and videos are listed batch-major in placeholder order (all of sequence 0's, then 1's ...):
``pixel_values`` holds their patch rows one after another, ``image_grid_thw`` one (t, h, w) row
per image; the same for videos. ``second_per_grid_ts`` (one per video, optional) is how many
seconds of the video one temporal patch spans, as transformers' Qwen2.5-VL processor returns it
(its temporal positions advance by that times ``tokens_per_second``); None means 1 s each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_copd.models.qwen_vl.spec import QwenVisionSpec


@dataclass
class QwenVisualInputs:
    """What the HF processor returns for the media of a batch (any of them may be None)."""

    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: torch.Tensor | None = None  # [videos] float64

    FIELDS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
              "second_per_grid_ts")

    def numel(self) -> int:
        return sum(x.numel() for x in (self.pixel_values, self.pixel_values_videos)
                   if x is not None)

    @classmethod
    def cat(cls, items: Sequence[QwenVisualInputs]) -> QwenVisualInputs:
        """The media of several batches, one after another."""
        parts = []
        for field in cls.FIELDS[:4]:
            got = [getattr(m, field) for m in items if getattr(m, field) is not None]
            parts.append(torch.cat(got) if got else None)
        return cls(*parts, second_per_grid_ts=_cat_seconds(items))

    def to(self, device) -> QwenVisualInputs:
        return QwenVisualInputs(*(None if x is None else x.to(device)
                                  for x in (getattr(self, f) for f in self.FIELDS)))

    def seconds(self) -> torch.Tensor | None:
        """Seconds per temporal patch of each video (1.0 where none were given)."""
        if self.video_grid_thw is None:
            return None
        if self.second_per_grid_ts is None:
            return torch.ones(len(self.video_grid_thw), dtype=torch.float64,
                              device=self.video_grid_thw.device)
        return self.second_per_grid_ts.double()

    def per_sequence(self, seqs: Sequence[Sequence[int]], spec: QwenVisionSpec
                     ) -> list[tuple[int, int]]:
        """(images, videos) of each sequence, from its placeholder counts; ValueError (one line)
        when the placeholders and the grids disagree."""
        out = []
        queues = {"image": _tokens_per_item(self.image_grid_thw, spec),
                  "video": _tokens_per_item(self.video_grid_thw, spec)}
        used = {"image": 0, "video": 0}
        for i, s in enumerate(seqs):
            counts = []
            for kind, tok in (("image", spec.image_token_id), ("video", spec.video_token_id)):
                slots, n = sum(1 for t in s if t == tok), 0
                while slots > 0 and used[kind] < len(queues[kind]):
                    slots -= queues[kind][used[kind]]
                    used[kind] += 1
                    n += 1
                if slots != 0:
                    raise ValueError(f"sequence {i}: its {kind} placeholders (id {tok}) do not "
                                     f"add up to whole {kind}s of the grids given")
                counts.append(n)
            out.append((counts[0], counts[1]))
        for kind in queues:
            if used[kind] != len(queues[kind]):
                raise ValueError(f"{len(queues[kind])} {kind}(s) given but the sequences hold "
                                 f"placeholders for {used[kind]}")
        return out

    def select(self, counts: list[tuple[int, int]], rows: Sequence[int]
               ) -> QwenVisualInputs | None:
        """The media of sequences ``rows`` (indices into the sequences ``counts`` describes)."""
        parts, video_pick = [], []
        for k, (values, grid) in enumerate(((self.pixel_values, self.image_grid_thw),
                                            (self.pixel_values_videos, self.video_grid_thw))):
            items = [c[k] for c in counts]
            starts = [sum(items[:r]) for r in range(len(items))]
            pick = [starts[r] + j for r in rows for j in range(items[r])]
            if not pick:
                parts += [None, None]
                continue
            chosen = grid[torch.tensor(pick, device=grid.device)]
            if k == 1:
                video_pick = pick
            if values is None:  # grids only (a later pipeline stage: positions need no pixels)
                parts += [None, chosen]
                continue
            patches = grid.prod(-1).tolist()
            offsets = [sum(patches[:i]) for i in range(len(patches))]
            idx = torch.cat([torch.arange(offsets[i], offsets[i] + patches[i]) for i in pick])
            parts += [values[idx.to(values.device)], chosen]
        if parts[1] is None and parts[3] is None:
            return None
        seconds = (None if self.second_per_grid_ts is None or not video_pick
                   else self.second_per_grid_ts[torch.tensor(
                       video_pick, device=self.second_per_grid_ts.device)])
        return QwenVisualInputs(*parts, second_per_grid_ts=seconds)


def _cat_seconds(items: Sequence[QwenVisualInputs]) -> torch.Tensor | None:
    """The videos' seconds per temporal patch, 1.0 for the videos of items that gave none."""
    if all(m.second_per_grid_ts is None for m in items):
        return None
    got = [m.seconds() for m in items if m.video_grid_thw is not None]
    return torch.cat(got) if got else None


def _tokens_per_item(grid: torch.Tensor | None, spec: QwenVisionSpec) -> list[int]:
    if grid is None:
        return []
    return [t * h * w // spec.merge_unit for t, h, w in grid.tolist()]
