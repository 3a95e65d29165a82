"""``Qwen3VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` ``config.json``
<-> :class:`ModelConfig` with ``model.qwen_vl`` set. Dense models only; options this
implementation does not compute are refused with one line naming the field."""

from __future__ import annotations

from typing import Any

import torch

from megatron_copd.config import ConfigError, ModelConfig, QwenVLConfig
from megatron_copd.models.conversion.hf_config import (
    QWEN_VL_DECODERS,
    HFModelInfo,
    SpecialTokens,
    _dtype_name,
    hf_text_config,
    qwen_vl_text,
)

# What each version's tower computes, as config.json names it.
VISION_ACT = {"qwen3_vl": "gelu_pytorch_tanh", "qwen2_5_vl": "silu"}
DEFAULT_MROPE = {"qwen3_vl": [24, 20, 20], "qwen2_5_vl": [16, 24, 24]}
DEFAULT_PATCH = {"qwen3_vl": 16, "qwen2_5_vl": 14}


def qwen_vl_from_hf(cfg: dict[str, Any], where: str = "config.json") -> HFModelInfo:
    version = cfg.get("model_type")
    if version not in QWEN_VL_DECODERS:
        raise ConfigError(f"{where}: model_type {version!r} is not a Qwen-VL model; expected "
                          f"one of {sorted(QWEN_VL_DECODERS)}")
    info = qwen_vl_text(cfg, where)
    v = cfg.get("vision_config")
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: field 'vision_config' is missing")
    vw = f"{where}: vision_config"
    act = v.get("hidden_act", VISION_ACT[version])
    if act != VISION_ACT[version]:
        raise ConfigError(f"{vw}.hidden_act={act!r} is not supported; expected "
                          f"{VISION_ACT[version]!r}")
    rope = dict(v.get("rope_parameters") or {})
    if rope.get("rope_type", "axial") != "axial":
        raise ConfigError(f"{vw}.rope_parameters.rope_type={rope['rope_type']!r} is not "
                          "supported; expected 'axial'")
    for key in ("patch_size", "temporal_patch_size"):
        if not isinstance(v.get(key, 2), int):
            raise ConfigError(f"{vw}.{key}={v[key]!r} is not supported; expected one integer")
    if int(v.get("in_channels", 3)) != 3:
        raise ConfigError(f"{vw}.in_channels={v['in_channels']} is not supported; expected 3")
    text = cfg.get("text_config") or {}
    trope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    model = info.model
    if int(v.get("out_hidden_size", model.hidden_size)) != model.hidden_size:
        raise ConfigError(f"{vw}.out_hidden_size={v['out_hidden_size']} must equal "
                          f"text_config.hidden_size={model.hidden_size}")
    q = QwenVLConfig(
        version=version,
        depth=int(v["depth"]),
        hidden_size=int(v["hidden_size"]),
        num_heads=int(v["num_heads"]),
        intermediate_size=int(v["intermediate_size"]),
        patch_size=int(v.get("patch_size", DEFAULT_PATCH[version])),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        mrope_section=[int(x) for x in trope.get("mrope_section", DEFAULT_MROPE[version])],
        # transformers' Qwen3-VL always interleaves, Qwen2.5-VL never, whatever config.json says
        mrope_interleaved=version == "qwen3_vl",
        image_token_id=int(cfg.get("image_token_id", 151655)),
        video_token_id=int(cfg.get("video_token_id", 151656)),
        vision_start_token_id=int(cfg.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(cfg.get("vision_end_token_id", 151653)),
    )
    if version == "qwen3_vl":
        q.num_position_embeddings = int(v.get("num_position_embeddings", 2304))
        q.deepstack_visual_indexes = [int(i) for i in v.get("deepstack_visual_indexes", [])]
    else:
        q.window_size = int(v.get("window_size", 112))
        q.fullatt_block_indexes = [int(i) for i in v.get("fullatt_block_indexes", [])]
        q.tokens_per_second = float(v.get("tokens_per_second", 4))
    model.qwen_vl = q
    _check(model, where)
    info.image_token_id = q.image_token_id
    return info


def _check(model: ModelConfig, where: str) -> None:
    """The model-config rules (config.validate) as one line naming the HF field."""
    from megatron_copd.config import ParallelConfig, validate_qwen_vl

    try:
        validate_qwen_vl(model, ParallelConfig())
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}".replace("model.qwen_vl.", "vision_config.")) from None


def hf_qwen_vl_config(model: ModelConfig, dtype: torch.dtype, tokens: SpecialTokens) -> dict:
    """``config.json`` of the Qwen-VL model (its ``model.qwen_vl.version``) that computes
    ``model``."""
    q = model.qwen_vl
    version = q.version
    decoder, arch = QWEN_VL_DECODERS[version]
    text = hf_text_config(model, dtype, tokens)
    for k in ("architectures", "use_sliding_window"):
        text.pop(k, None)
    text["model_type"] = f"{version}_text"
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": float(model.rotary_base),
                               "mrope_section": list(q.mrope_section)}
    if version == "qwen3_vl":
        text["rope_parameters"]["mrope_interleaved"] = q.mrope_interleaved
    vision = {
        "model_type": f"{version}_vision",
        "depth": q.depth,
        "hidden_size": q.hidden_size,
        "hidden_act": VISION_ACT[version],
        "intermediate_size": q.intermediate_size,
        "num_heads": q.num_heads,
        "in_channels": 3,
        "patch_size": q.patch_size,
        "spatial_merge_size": q.spatial_merge_size,
        "temporal_patch_size": q.temporal_patch_size,
        "out_hidden_size": model.hidden_size,
        "initializer_range": model.init_std,
        "rope_parameters": {"rope_type": "axial", "rope_theta": q.rope_theta},
    }
    if version == "qwen3_vl":
        vision.update(num_position_embeddings=q.num_position_embeddings,
                      deepstack_visual_indexes=list(q.deepstack_visual_indexes))
    else:
        vision.update(window_size=q.window_size,
                      fullatt_block_indexes=list(q.fullatt_block_indexes),
                      tokens_per_second=_number(q.tokens_per_second))
    return {
        "architectures": [arch],
        "model_type": version,
        "text_config": text,
        "vision_config": vision,
        "image_token_id": q.image_token_id,
        "video_token_id": q.video_token_id,
        "vision_start_token_id": q.vision_start_token_id,
        "vision_end_token_id": q.vision_end_token_id,
        "tie_word_embeddings": model.tie_embeddings,
        "dtype": _dtype_name(dtype),
    }


def _number(x: float) -> int | float:
    """transformers declares some of these fields int: write whole numbers as integers."""
    return int(x) if float(x).is_integer() else x
