"""The Qwen3-VL-4B-class example configs load, carry the paper's hyperparameters, and describe a
model the HF exporter can write (checked against transformers' own config classes)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_copd.config import load_config
from megatron_copd.models.conversion.hf_config import (
    SpecialTokens,
    check_exportable,
    hf_config,
    model_config_from_hf,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name,branches", [("qwen3vl_4b_2branch", 2), ("qwen3vl_4b_3branch", 3)])
def test_example_config(name, branches):
    import transformers as T

    cfg = load_config(EXAMPLES / f"{name}.yaml")
    assert len(cfg.branches) == branches and cfg.world_size == 8 * branches
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp) == (2, 1, 4)
    g = cfg.grpo
    assert (g.group_size, g.temperature, g.eps_low, g.eps_high, g.kl_coef) == (8, 1.0, 0.2, 0.28,
                                                                              0.0)
    assert g.prompts_per_step == 256 and g.max_new_tokens == 16384
    assert cfg.data.max_prompt_tokens == 16384
    assert (cfg.optim.lr, cfg.optim.lr_schedule) == (1e-6, "constant")
    s = cfg.schedule
    assert s.s_rl / s.s_opd == 1.5
    assert (s.topology, s.hub) == (("pair", None) if branches == 2 else ("hub", "text"))
    m = cfg.model
    assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.num_query_groups,
            m.head_dim, m.ffn_hidden_size, m.vocab_size) == (2560, 36, 32, 8, 128, 9728, 151936)
    assert m.use_qk_norm and m.tie_embeddings and m.vision.tokens_per_image == 577
    check_exportable(m)
    hf = hf_config(m, torch.bfloat16, SpecialTokens(151643, 151645, 151643, 151655))
    llava = T.LlavaConfig.from_dict(hf)
    assert llava.text_config.num_hidden_layers == 36 and llava.vision_config.image_size == 336
    back = model_config_from_hf(llava.to_dict()).model.vision
    assert back == dataclasses.replace(m.vision, max_frames=back.max_frames)  # not an HF field
