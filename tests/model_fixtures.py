"""Tiny configs and deterministic inputs shared by model tests."""

from __future__ import annotations

import torch

from megatron_copd.config import RunConfig
from megatron_copd.config_base import from_dict

IMAGE_TOKEN = 5


def tiny_config(tp: int = 1, pp: int = 1, vision: bool = False, branches=("a",), **model) -> RunConfig:
    data = {
        "branches": [{"name": n} for n in branches],
        "parallel": {"tp": tp, "pp": pp},
        "model": {"hidden_size": 64, "num_layers": 2, "ffn_hidden_size": 128,
                  "vocab_size": 256, "max_sequence_length": 64, **model},
    }
    if vision:
        data["model"]["vision"] = {"image_size": 16, "patch_size": 8, "hidden_size": 32,
                                   "num_layers": 1, "num_attention_heads": 2,
                                   "ffn_hidden_size": 64}
    return from_dict(RunConfig, data)


def lm_batch(batch: int = 2, seq: int = 24, vocab: int = 256, images_at: int | None = None,
             tokens_per_image: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(IMAGE_TOKEN + 1, vocab, (batch, seq), generator=g)
    pixels = None
    if images_at is not None:
        tokens[0, images_at:images_at + tokens_per_image] = IMAGE_TOKEN
        pixels = torch.randn(1, 3, 16, 16, generator=g)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1).view(1, 1, seq, seq)
    return {
        "tokens": tokens,
        "labels": torch.roll(tokens, -1, dims=1),
        "position_ids": torch.arange(seq).unsqueeze(0).expand(batch, -1),
        "attention_mask": mask.expand(batch, 1, seq, seq),
        "pixels": pixels,
    }
