"""Rotary embeddings of the Qwen-VL family, as megatron's attention consumes them: angles of shape
``[s, b, 1, head_dim]`` (or ``[s, 1, 1, head_dim]``) laid out for the non-interleaved
rotate-half form (``cat(angles, angles)``)."""

from __future__ import annotations

import torch
from torch import nn


def inverse_frequencies(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


class MultimodalRoPE(nn.Module):
    """Multimodal RoPE over 3-D position ids ``[3, b, s]`` (t, h, w).

    Each frequency pair takes its angle from one position component. Qwen3-VL interleaves them:
    pair j uses h when ``j % 3 == 1`` and ``j < 3 * section[1]``, w when ``j % 3 == 2`` and
    ``j < 3 * section[2]``, t otherwise. Qwen2-VL/2.5-VL use three consecutive blocks of
    ``section`` pairs. Called by GPTModel as ``rotary_pos_emb(position_ids, mrope_section, ...)``
    in place of megatron's (block-only) MultimodalRotaryEmbedding.
    """

    def __init__(self, head_dim: int, theta: float, section: tuple[int, int, int],
                 interleaved: bool) -> None:
        super().__init__()
        if 2 * sum(section) != head_dim:
            raise ValueError(f"mrope_section {list(section)} must sum to head_dim/2 = "
                             f"{head_dim // 2}")
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, theta), persistent=False)
        half = head_dim // 2
        source = torch.zeros(half, dtype=torch.long)  # which component drives each pair
        if interleaved:
            for comp in (1, 2):
                source[comp:3 * section[comp]:3] = comp
        else:
            source[section[0]:section[0] + section[1]] = 1
            source[section[0] + section[1]:] = 2
        self.register_buffer("source", source, persistent=False)

    def forward(self, position_ids: torch.Tensor, mrope_section=None, cp_group=None,
                **_) -> torch.Tensor:
        if position_ids.dim() == 2:  # text only: all components equal
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        inv = self.inv_freq.to(position_ids.device)
        # angles[c, b, s, j] = pos[c, b, s] * inv[j]; pick component source[j] for pair j.
        angles = position_ids.to(torch.float32).unsqueeze(-1) * inv
        src = self.source.to(position_ids.device).view(1, 1, 1, -1).expand(1, *angles.shape[1:])
        picked = angles.gather(0, src)[0]  # [b, s, half]
        emb = torch.cat([picked, picked], dim=-1)
        return emb.transpose(0, 1).unsqueeze(2).contiguous()  # [s, b, 1, head_dim]


def vision_rope_angles(coords: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """2-D RoPE of the vision tower: ``coords [patches, 2]`` (row, col) -> ``[patches, 1, 1, d]``.

    A quarter of the head's frequency pairs rotate with the row, a quarter with the column
    (frequencies of a head_dim/2 rotary), and the rotate-half layout repeats both halves.
    """
    inv = inverse_frequencies(head_dim // 2, theta).to(coords.device)
    rows = coords[:, 0:1].to(torch.float32) * inv
    cols = coords[:, 1:2].to(torch.float32) * inv
    half = torch.cat([rows, cols], dim=-1)
    return torch.cat([half, half], dim=-1)[:, None, None, :]
