"""The Qwen3-VL-4B and Qwen2.5-VL-7B example configs load, carry the paper's hyperparameters,
and describe the model the HF exporter writes as Qwen3-VL-4B-Instruct / Qwen2.5-VL-7B-Instruct
(checked against transformers' own config classes)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_copd.config import load_config
from megatron_copd.models.conversion import families
from megatron_copd.models.conversion.hf_config import SpecialTokens

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
    assert m.use_qk_norm and m.tie_embeddings and m.vision is None
    q = m.qwen_vl
    assert (q.depth, q.hidden_size, q.num_heads, q.intermediate_size, q.patch_size,
            q.deepstack_visual_indexes) == (24, 1024, 16, 4096, 16, [5, 11, 17])
    families.check_exportable(m, "example")
    hf = families.export_config(m, torch.bfloat16, SpecialTokens(151643, 151645, 151643))
    qwen = T.Qwen3VLConfig.from_dict(hf)
    assert qwen.text_config.num_hidden_layers == 36 and qwen.vision_config.out_hidden_size == 2560
    assert qwen.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
    back = families.model_config_from_hf(qwen.to_dict(), "config.json").model
    processor_only = ("min_pixels", "max_pixels", "max_frames", "video_fps", "video_min_pixels",
                      "video_max_pixels")  # not config.json fields
    assert back.qwen_vl == dataclasses.replace(
        q, **{k: getattr(back.qwen_vl, k) for k in processor_only})
    assert dataclasses.replace(back, qwen_vl=None, max_sequence_length=m.max_sequence_length,
                               rotary_base=m.rotary_base) == dataclasses.replace(m, qwen_vl=None)


@pytest.mark.parametrize("branches", [2, 3])
def test_qwen2_5_vl_7b_example_config(branches):
    """The Qwen2.5-VL-7B examples: the paper's hyperparameters as above, and the model the
    exporter writes is Qwen2.5-VL-7B-Instruct's shape (transformers' config class reads it)."""
    import transformers as T

    cfg = load_config(EXAMPLES / f"qwen2_5vl_7b_{branches}branch.yaml")
    assert len(cfg.branches) == branches and cfg.world_size == 8 * branches
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp) == (4, 1, 2)
    g = cfg.grpo
    assert (g.group_size, g.eps_low, g.eps_high, g.prompts_per_step) == (8, 0.2, 0.28, 256)
    assert cfg.schedule.s_rl / cfg.schedule.s_opd == 1.5 and cfg.optim.lr == 1e-6
    m = cfg.model
    assert (m.family, m.hidden_size, m.num_layers, m.num_attention_heads, m.num_query_groups,
            m.head_dim, m.ffn_hidden_size, m.vocab_size) == ("qwen2", 3584, 28, 28, 4, 128,
                                                             18944, 152064)
    assert m.qkv_bias and not m.use_qk_norm and not m.tie_embeddings
    q = m.qwen_vl
    assert (q.version, q.depth, q.hidden_size, q.num_heads, q.intermediate_size, q.patch_size,
            q.window_size, q.fullatt_block_indexes) == ("qwen2_5_vl", 32, 1280, 16, 3420, 14,
                                                        112, [7, 15, 23, 31])
    families.check_exportable(m, "example")
    hf = families.export_config(m, torch.bfloat16, SpecialTokens(151643, 151645, 151643))
    qwen = T.Qwen2_5_VLConfig.from_dict(hf)
    assert qwen.text_config.num_hidden_layers == 28 and qwen.vision_config.out_hidden_size == 3584
    assert qwen.vision_config.fullatt_block_indexes == [7, 15, 23, 31]
    back = families.model_config_from_hf(qwen.to_dict(), "config.json").model
    processor_only = ("min_pixels", "max_pixels", "max_frames", "video_fps", "video_min_pixels",
                      "video_max_pixels")
    assert back.qwen_vl == dataclasses.replace(
        q, **{k: getattr(back.qwen_vl, k) for k in processor_only})
