"""Conversion building blocks: QKV / gated-MLP layouts, config translation both ways, the
mapping's coverage of the model's own checkpoint keys, and the streaming safetensors writer."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from megatron_copd.config import ModelConfig, VisionConfig
from megatron_copd.config_base import to_dict
from megatron_copd.models.conversion import mapping as mp
from megatron_copd.models.conversion import tensors
from megatron_copd.models.conversion.hf_config import (
    SpecialTokens,
    check_exportable,
    hf_config,
    model_config_from_hf,
)
from megatron_copd.models.conversion.safetensors_io import ShardWriter, plan_shards


def test_qkv_layout_is_per_query_group():
    ng, hpg, d, h = 2, 3, 4, 5
    # every row says which head it belongs to: q heads 0..5, k heads 100.., v heads 200..
    q = torch.arange(ng * hpg).repeat_interleave(d).float()[:, None].expand(-1, h)
    k = (100 + torch.arange(ng)).repeat_interleave(d).float()[:, None].expand(-1, h)
    v = (200 + torch.arange(ng)).repeat_interleave(d).float()[:, None].expand(-1, h)
    qkv = tensors.fuse_qkv(q, k, v, ng)
    heads = qkv[::d, 0].tolist()
    assert heads == [0, 1, 2, 100, 200, 3, 4, 5, 101, 201]
    for a, b in zip(tensors.split_qkv(qkv, ng, hpg, d), (q, k, v)):
        assert torch.equal(a, b)
    bias = torch.randn(ng * (hpg + 2) * d)
    qb, kb, vb = tensors.split_qkv(bias, ng, hpg, d)
    assert torch.equal(tensors.fuse_qkv(qb, kb, vb, ng), bias)


def test_gate_up_stacking():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = tensors.fuse_gate_up(gate, up)
    assert torch.equal(fc1[:6], gate) and torch.equal(fc1[6:], up)
    g2, u2 = tensors.split_gate_up(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


MODELS = {
    "qwen3": ModelConfig(family="qwen3", vocab_size=300, hidden_size=64, num_layers=3,
                         num_attention_heads=4, num_query_groups=2, kv_channels=32,
                         ffn_hidden_size=96, tie_embeddings=True, rotary_base=5e5,
                         norm_epsilon=1e-5, max_sequence_length=128),
    "llama": ModelConfig(family="llama", vocab_size=300, hidden_size=64, num_layers=2,
                         num_attention_heads=8, num_query_groups=8, ffn_hidden_size=96,
                         tie_embeddings=False, rotary_base=10000.0),
    "vlm": ModelConfig(family="qwen3", vision=VisionConfig(image_size=32, patch_size=8,
                                                           hidden_size=48, num_layers=2,
                                                           num_attention_heads=4,
                                                           ffn_hidden_size=80,
                                                           class_token=True)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_config_round_trip(name):
    model = MODELS[name]
    cfg = hf_config(model, torch.bfloat16, SpecialTokens(1, 2, 3, image_token_id=7))
    info = model_config_from_hf(cfg)
    back = to_dict(info.model)
    want = to_dict(model)
    want["qk_layernorm"] = model.use_qk_norm  # the HF side is explicit
    if want["vision"]:
        want["vision"]["max_frames"] = back["vision"]["max_frames"]
    assert back == want
    assert info.dtype == torch.bfloat16
    if model.vision:
        assert info.image_token_id == 7 and cfg["image_seq_length"] == 17
    else:
        assert cfg["architectures"] == [{"qwen3": "Qwen3ForCausalLM",
                                         "llama": "LlamaForCausalLM"}[name]]


def _base_text(**kw) -> dict:
    cfg = hf_config(MODELS["llama"], torch.float32, SpecialTokens())
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("change,message", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]},
     "architecture 'MistralForCausalLM' (model_type 'mistral') is not supported"),
    ({"model_type": "qwen3_vl"}, "model_type 'qwen3_vl': this reads its language model only"),
    ({"model_type": "qwen2_vl"}, "model_type 'qwen2_vl' is not supported (Qwen2-VL's vision"),
    ({"model_type": "qwen3_vl_moe"}, "'qwen3_vl_moe' is not supported: its decoder is a mixture"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope type 'llama3' is not supported"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3 does not divide"),
    ({"architectures": ["LlamaForSequenceClassification"]},
     "only 'LlamaForCausalLM' is supported"),
])
def test_unsupported_text_configs_are_refused(change, message):
    from megatron_copd.errors import UserError

    with pytest.raises(UserError) as e:
        model_config_from_hf(_base_text(**change), "x/config.json")
    assert message in str(e.value) and "\n" not in str(e.value) and "x/config.json" in str(e.value)


@pytest.mark.parametrize("change,message", [
    ({"vision_feature_select_strategy": "default"}, "vision_feature_select_strategy='default'"),
    ({"vision_feature_layer": [-2, -1]}, "only a single layer"),
    ({"vision_feature_layer": -3}, "selects no transformer layer"),
    ({"vision_config": {"hidden_act": "quick_gelu"}}, "hidden_act='quick_gelu'"),
    ({"vision_config": {"model_type": "siglip_vision_model"}}, "'siglip_vision_model'"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act='relu'"),
])
def test_unsupported_llava_configs_are_refused(change, message):
    from megatron_copd.errors import UserError

    cfg = hf_config(MODELS["vlm"], torch.float32, SpecialTokens(image_token_id=7))
    for k, v in change.items():
        if isinstance(v, dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        model_config_from_hf(cfg)


def test_feature_layer_selects_vision_depth():
    cfg = hf_config(MODELS["vlm"], torch.float32, SpecialTokens(image_token_id=7))
    cfg["vision_feature_layer"] = -2
    assert model_config_from_hf(cfg).model.vision.num_layers == 1
    cfg["vision_feature_layer"] = 2
    assert model_config_from_hf(cfg).model.vision.num_layers == 2


def test_export_refusals():
    from megatron_copd.errors import UserError

    vlm = MODELS["vlm"]
    no_cls = ModelConfig(vision=VisionConfig(class_token=False))
    with pytest.raises(UserError, match="class_token: false cannot be exported"):
        check_exportable(no_cls)
    odd = ModelConfig(extra={"apply_residual_connection_post_layernorm": True})
    with pytest.raises(UserError, match="apply_residual_connection_post_layernorm"):
        check_exportable(odd)
    check_exportable(ModelConfig(extra={"apply_rope_fusion": True}))
    check_exportable(vlm)


def _model_keys(model_cfg: dict) -> dict:
    """The model's own torch_dist tensor keys and global shapes (a 1-process world)."""
    from harness import run_world

    return run_world(_keys_worker, 1, args=(model_cfg,))[0]


def _keys_worker(rank, world, model_cfg):
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        ShardedTensorFactory,
    )

    from megatron_copd.checkpoint.model_io import sharded_model_state
    from megatron_copd.config import RunConfig
    from megatron_copd.config_base import from_dict
    from megatron_copd.models.factory import build_model
    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.megatron_state import init_megatron_state

    cfg = from_dict(RunConfig, {"branches": [{"name": "a", "domains": ["text"]}],
                                "model": model_cfg})
    groups = build_branch_groups(BranchLayout.from_world(("a",), world, tp=1, pp=1))
    init_megatron_state(groups, 1)
    model = build_model(cfg, groups.pgs, image_token_id=4)
    keys, objects = {}, set()
    for v in sharded_model_state(model, groups.pgs).values():
        if isinstance(v, ShardedTensorFactory):
            keys[v.key] = None
        elif isinstance(v, ShardedTensor):
            keys[v.key] = tuple(v.global_shape)
        else:
            objects.add(v.unique_key)
    return keys, objects


def test_mapping_covers_the_models_checkpoint_keys():
    model = ModelConfig(family="qwen3", vocab_size=128, hidden_size=64, num_layers=2,
                        num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                        tie_embeddings=False,
                        vision=VisionConfig(image_size=16, patch_size=8, hidden_size=32,
                                            num_layers=2, num_attention_heads=2,
                                            ffn_hidden_size=64, class_token=True))
    keys, objects = _model_keys(to_dict(model))
    maps = mp.param_maps(model, mp.LLAVA_NAMES)
    mine = {mp.MODEL_PREFIX + p.mcore: p.stored_shape for p in maps.params}
    assert set(mine) == set(keys)
    for k, shape in keys.items():
        if shape is not None:  # the gated fc1 is a factory: its shape is checked by logits
            assert mine[k] == shape, k
    assert {mp.MODEL_PREFIX + k for k in mp.extra_state_keys(model)} == objects


def test_streaming_shard_writer(tmp_path):
    entries = [("a", (3, 4), torch.float32), ("b", (5,), torch.bfloat16),
               ("c", (2, 2, 2), torch.float16), ("d", (7, 3), torch.float32)]
    plan = plan_shards(entries, max_shard_bytes=60)
    assert len(plan.files) == 3
    data = {n: torch.randn(s).to(dt) for n, s, dt in entries}
    w = ShardWriter(tmp_path, plan)
    # out of order, and "d" in two row blocks
    w.write("d", data["d"][4:], 4 * 3 * 4)
    for n in ("c", "a", "b"):
        w.write(n, data[n])
    w.write("d", data["d"][:4])
    w.finish()
    got = {}
    for f in plan.files:
        with safe_open(str(tmp_path / f), "pt") as h:
            got.update({k: h.get_tensor(k) for k in h.keys()})
    assert set(got) == set(data)
    for n, t in data.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n
    (tmp_path / "partial").mkdir()
    w2 = ShardWriter(tmp_path / "partial", plan_shards(entries[:1], 100))
    with pytest.raises(Exception, match="incomplete"):
        w2.finish()
