"""Helpers for the rollout tests: tiny models on a given branch layout, full-vocab references."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_copd.config import RunConfig
from megatron_copd.config_base import from_dict
from megatron_copd.models.factory import build_model
from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
from megatron_copd.runtime.megatron_state import init_megatron_state, seed_everything

IMAGE_TOKEN = 5
VOCAB = 512


def tiny_config(tp: int = 1, pp: int = 1, vision: bool = False, max_len: int = 128) -> RunConfig:
    model = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "num_layers": 2,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "ffn_hidden_size": 128,
        "max_sequence_length": max_len,
    }
    if vision:
        model["vision"] = {
            "image_size": 16,
            "patch_size": 8,
            "hidden_size": 32,
            "num_layers": 1,
            "num_attention_heads": 2,
            "ffn_hidden_size": 64,
        }
    return from_dict(
        RunConfig, {"branches": [{"name": "a", "domains": ["text"]}], "model": model,
                    "parallel": {"tp": tp, "pp": pp}}
    )


def groups(names=("a",), tp=1, pp=1):
    layout = BranchLayout.from_world(tuple(names), dist.get_world_size(), tp=tp, pp=pp)
    return build_branch_groups(layout)


def build(g, seed: int, tp=1, pp=1, vision=False, max_len=128):
    """Model with weights from ``seed`` (equal weights at every TP size on CPU)."""
    init_megatron_state(g, seed)
    seed_everything(seed, g.tp_rank)
    cfg = tiny_config(tp, pp, vision, max_len)
    model = build_model(cfg, g.pgs, image_token_id=IMAGE_TOKEN if vision else None)
    model.eval()
    return model


def full_logits(model, g, batch, pixels=None):
    """Plain full forward of a packed batch -> full-vocab logits [B, T, V] (last stage)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    with torch.no_grad():
        out = model(batch.tokens, batch.position_ids, batch.attention_mask, pixels=pixels)
    return gather_from_tensor_model_parallel_region(out, group=g.pgs.tp)


def prompts_for(seed: int, n: int, lo: int = 3, hi: int = 12, vocab: int = VOCAB):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        out.append(torch.randint(6, vocab, (length,), generator=gen).tolist())
    return out


def copy_stage_weights(dst, src, pp_rank: int, pp_size: int, num_layers: int = 2) -> None:
    """Load this pipeline stage ``dst`` from a full (PP=1) model ``src`` of the same TP layout.

    (A checkpoint round trip would do too, but megatron's tied-embedding sharded state dict at
    PP > 1 reads the global parallel_state, which this project never initialises.)
    """
    import re

    per_stage = num_layers // pp_size
    src_sd = src.state_dict()
    dst_sd = dst.state_dict()
    for name, tensor in dst_sd.items():
        if "_extra_state" in name:
            continue
        key = re.sub(
            r"decoder\.layers\.(\d+)\.",
            lambda m: f"decoder.layers.{int(m.group(1)) + pp_rank * per_stage}.",
            name,
        )
        if key not in src_sd and key.endswith("output_layer.weight"):
            key = key.replace("output_layer.weight", "embedding.word_embeddings.weight")
        with torch.no_grad():
            tensor.copy_(src_sd[key])
