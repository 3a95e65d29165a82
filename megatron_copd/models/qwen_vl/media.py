"""The media of a batch for a Qwen-VL model, as the HF image / video processors return them, and
the per-sequence bookkeeping rollout needs (which images and videos belong to which sequence).

Images and videos are listed batch-major in placeholder order (all of sequence 0's, then 1's ...):
``pixel_values`` holds their patch rows one after another, ``image_grid_thw`` one (t, h, w) row
per image; the same for videos.
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

    def numel(self) -> int:
        return sum(x.numel() for x in (self.pixel_values, self.pixel_values_videos)
                   if x is not None)

    @classmethod
    def cat(cls, items: Sequence[QwenVisualInputs]) -> QwenVisualInputs:
        """The media of several batches, one after another."""
        parts = []
        for field in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            got = [getattr(m, field) for m in items if getattr(m, field) is not None]
            parts.append(torch.cat(got) if got else None)
        return cls(*parts)

    def to(self, device) -> QwenVisualInputs:
        return QwenVisualInputs(*(None if x is None else x.to(device) for x in (
            self.pixel_values, self.image_grid_thw, self.pixel_values_videos,
            self.video_grid_thw)))

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
        parts = []
        for k, (values, grid) in enumerate(((self.pixel_values, self.image_grid_thw),
                                            (self.pixel_values_videos, self.video_grid_thw))):
            items = [c[k] for c in counts]
            starts = [sum(items[:r]) for r in range(len(items))]
            pick = [starts[r] + j for r in rows for j in range(items[r])]
            if not pick:
                parts += [None, None]
                continue
            chosen = grid[torch.tensor(pick, device=grid.device)]
            if values is None:  # grids only (a later pipeline stage: positions need no pixels)
                parts += [None, chosen]
                continue
            patches = grid.prod(-1).tolist()
            offsets = [sum(patches[:i]) for i in range(len(patches))]
            idx = torch.cat([torch.arange(offsets[i], offsets[i] + patches[i]) for i in pick])
            parts += [values[idx.to(values.device)], chosen]
        return None if parts[1] is None and parts[3] is None else QwenVisualInputs(*parts)


def _tokens_per_item(grid: torch.Tensor | None, spec: QwenVisionSpec) -> list[int]:
    if grid is None:
        return []
    return [t * h * w // spec.merge_unit for t, h, w in grid.tolist()]
