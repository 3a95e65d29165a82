"""Position ids of a forward, for every model family: the token index counted from each row's
first real token (plain RoPE), or a Qwen-VL model's 3-D (t, h, w) ids, which depend on where
the images and video frames sit and how large they are.

During KV-cached decoding megatron's static path rotates the cached keys again at every step
with the rotary table of *all* cache slots, so a 3-D model's decode step passes the position ids
of the whole cache: :class:`DecodePositions` keeps them (prefill ids, then each new token at its
token index + the row's offset, the same in all three components).
"""

from __future__ import annotations

import torch
from megatron.core.utils import unwrap_model

from megatron_copd.models.qwen_vl.positions import mrope_position_ids
from megatron_copd.rollout import layout


def mrope_spec(model):
    """The Qwen-VL spec of ``model`` (None for a model with plain positions)."""
    return getattr(unwrap_model(model), "spec", None)


def position_ids(model, tokens: torch.Tensor, valid: torch.Tensor, media=None) -> torch.Tensor:
    """``[B, T]`` ids, or ``[3, B, T]`` for a Qwen-VL model (``media``: its QwenVisualInputs)."""
    spec = mrope_spec(model)
    if spec is None:
        return layout.position_ids(valid)
    pos, _ = _mrope(spec, tokens, valid, media)
    return pos.to(tokens.device)


def _mrope(spec, tokens, valid, media):
    images = None if media is None else media.image_grid_thw
    videos = None if media is None else media.video_grid_thw
    seconds = None if media is None or media.second_per_grid_ts is None else (
        media.second_per_grid_ts.tolist())
    return mrope_position_ids(tokens.cpu(), spec, None if images is None else images.cpu(),
                              None if videos is None else videos.cpu(), valid.cpu(), seconds)


class DecodePositions:
    """The cache's position ids for a 3-D-position model (see the module doc)."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.history: torch.Tensor | None = None  # [3, B, L]
        self.delta: torch.Tensor | None = None  # [B]: position - token index after the prompt

    def prefill(self, tokens: torch.Tensor, valid: torch.Tensor, media) -> torch.Tensor:
        pos, delta = _mrope(self.spec, tokens, valid, media)
        self.history, self.delta = pos.to(tokens.device), delta.to(tokens.device)
        return self.history

    def expand(self, index: torch.Tensor) -> None:
        self.history = self.history[:, index]
        self.delta = self.delta[index]

    def step(self, positions: torch.Tensor) -> torch.Tensor:
        """``positions [B]``: each new token's index in its row's real tokens -> ``[3, B, L+1]``."""
        new = (positions + self.delta).view(1, -1, 1).expand(3, -1, 1)
        self.history = torch.cat([self.history, new], dim=2)
        return self.history
