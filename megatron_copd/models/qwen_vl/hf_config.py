"""``Qwen3VLForConditionalGeneration``'s ``config.json`` <-> :class:`ModelConfig` with
``model.qwen_vl`` set. Dense Qwen3-VL only; options this implementation does not compute are
refused with one line naming the field."""

from __future__ import annotations

from typing import Any

import torch

from megatron_copd.config import ConfigError, ModelConfig, QwenVLConfig
from megatron_copd.models.conversion.hf_config import (
    HFModelInfo,
    SpecialTokens,
    _dtype_name,
    _qwen3_vl_text,
    hf_text_config,
)

ARCH = "Qwen3VLForConditionalGeneration"
DEFAULT_MROPE = [24, 20, 20]


def qwen3_vl_from_hf(cfg: dict[str, Any], where: str = "config.json") -> HFModelInfo:
    info = _qwen3_vl_text(cfg, where)
    v = cfg.get("vision_config")
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: field 'vision_config' is missing")
    vw = f"{where}: vision_config"
    act = v.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"{vw}.hidden_act={act!r} is not supported; expected "
                          "'gelu_pytorch_tanh'")
    rope = dict(v.get("rope_parameters") or {})
    if rope.get("rope_type", "axial") != "axial":
        raise ConfigError(f"{vw}.rope_parameters.rope_type={rope['rope_type']!r} is not "
                          "supported; expected 'axial'")
    for key in ("patch_size", "temporal_patch_size"):
        if not isinstance(v.get(key, 16), int):
            raise ConfigError(f"{vw}.{key}={v[key]!r} is not supported; expected one integer")
    if int(v.get("in_channels", 3)) != 3:
        raise ConfigError(f"{vw}.in_channels={v['in_channels']} is not supported; expected 3")
    text = cfg.get("text_config") or {}
    trope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    model = info.model
    if int(v.get("out_hidden_size", model.hidden_size)) != model.hidden_size:
        raise ConfigError(f"{vw}.out_hidden_size={v['out_hidden_size']} must equal "
                          f"text_config.hidden_size={model.hidden_size}")
    model.qwen_vl = QwenVLConfig(
        depth=int(v["depth"]),
        hidden_size=int(v["hidden_size"]),
        num_heads=int(v["num_heads"]),
        intermediate_size=int(v["intermediate_size"]),
        patch_size=int(v.get("patch_size", 16)),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        num_position_embeddings=int(v.get("num_position_embeddings", 2304)),
        deepstack_visual_indexes=[int(i) for i in v.get("deepstack_visual_indexes", [])],
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        mrope_section=[int(x) for x in trope.get("mrope_section", DEFAULT_MROPE)],
        # transformers' Qwen3-VL always interleaves, whatever config.json says.
        mrope_interleaved=True,
        image_token_id=int(cfg.get("image_token_id", 151655)),
        video_token_id=int(cfg.get("video_token_id", 151656)),
        vision_start_token_id=int(cfg.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(cfg.get("vision_end_token_id", 151653)),
    )
    _check(model, where)
    info.image_token_id = model.qwen_vl.image_token_id
    return info


def _check(model: ModelConfig, where: str) -> None:
    """The model-config rules (config.validate) as one line naming the HF field."""
    from megatron_copd.config import ParallelConfig, validate_qwen_vl

    try:
        validate_qwen_vl(model, ParallelConfig())
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}".replace("model.qwen_vl.", "vision_config.")) from None


def hf_qwen3_vl_config(model: ModelConfig, dtype: torch.dtype, tokens: SpecialTokens) -> dict:
    """``config.json`` of the ``Qwen3VLForConditionalGeneration`` that computes ``model``."""
    q = model.qwen_vl
    text = hf_text_config(model, dtype, tokens)
    for k in ("architectures", "use_sliding_window"):
        text.pop(k, None)
    text["model_type"] = "qwen3_vl_text"
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": float(model.rotary_base),
                               "mrope_section": list(q.mrope_section),
                               "mrope_interleaved": q.mrope_interleaved}
    vision = {
        "model_type": "qwen3_vl_vision",
        "depth": q.depth,
        "hidden_size": q.hidden_size,
        "hidden_act": "gelu_pytorch_tanh",
        "intermediate_size": q.intermediate_size,
        "num_heads": q.num_heads,
        "in_channels": 3,
        "patch_size": q.patch_size,
        "spatial_merge_size": q.spatial_merge_size,
        "temporal_patch_size": q.temporal_patch_size,
        "out_hidden_size": model.hidden_size,
        "num_position_embeddings": q.num_position_embeddings,
        "deepstack_visual_indexes": list(q.deepstack_visual_indexes),
        "initializer_range": model.init_std,
        "rope_parameters": {"rope_type": "axial", "rope_theta": q.rope_theta},
    }
    return {
        "architectures": [ARCH],
        "model_type": "qwen3_vl",
        "text_config": text,
        "vision_config": vision,
        "image_token_id": q.image_token_id,
        "video_token_id": q.video_token_id,
        "vision_start_token_id": q.vision_start_token_id,
        "vision_end_token_id": q.vision_end_token_id,
        "tie_word_embeddings": model.tie_embeddings,
        "dtype": _dtype_name(dtype),
    }
