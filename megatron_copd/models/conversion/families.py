"""Which Hugging Face family a model config belongs to, and that family's interop pieces.

The text decoders and LLaVA live in :mod:`hf_config` / :mod:`mapping`; each further family in a
folder of its own (``models/qwen_vl``). Import and export ask this module, so neither the generic
converters nor the family modules import each other in a circle.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from megatron_copd.config import ModelConfig
from megatron_copd.models.conversion import hf_config as generic
from megatron_copd.models.conversion import mapping as mp
from megatron_copd.models.qwen_vl import hf_config as qwen_vl_config
from megatron_copd.models.qwen_vl import hf_weights as qwen_vl_weights
from megatron_copd.models.qwen_vl.processing import processor_config, video_processor_config
from megatron_copd.models.qwen_vl.spec import spec_from_model

# Files of an HF model directory that describe its media processing (copied with the tokenizer).
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json",
                   "processor_config.json", "chat_template.json", "chat_template.jinja")


def model_config_from_hf(cfg: dict[str, Any], where: str, text_only: bool = False
                         ) -> generic.HFModelInfo:
    if cfg.get("model_type") in generic.QWEN_VL_DECODERS and not text_only:
        return qwen_vl_config.qwen_vl_from_hf(cfg, where)
    return generic.model_config_from_hf(cfg, where, text_only=text_only)


def import_maps(info: generic.HFModelInfo, names: mp.HFNames) -> mp.ModelMapping:
    if info.model.qwen_vl is not None:
        return qwen_vl_weights.qwen_vl_maps(info.model, spec_from_model(info.model), names)
    return mp.param_maps(info.model, names, info.hf_vision_layers)


def text_only(model: ModelConfig) -> tuple[ModelConfig, tuple[str, ...]]:
    """The language model alone, and the megatron key prefixes that are left out."""
    if model.qwen_vl is not None:
        return dataclasses.replace(model, qwen_vl=None), ("vision_model.",)
    if model.vision is not None:
        return dataclasses.replace(model, vision=None), ("vision_model.", "vision_projection.")
    return model, ()


def export_maps(model: ModelConfig) -> mp.ModelMapping:
    if model.qwen_vl is not None:
        return qwen_vl_weights.qwen_vl_maps(model, spec_from_model(model))
    return mp.param_maps(model, mp.LLAVA_NAMES if model.vision is not None else mp.TEXT_NAMES)


def needs_image_token(model: ModelConfig) -> bool:
    """Whether the export needs the tokenizer's image token (LLaVA's config names it)."""
    return model.vision is not None


def check_exportable(model: ModelConfig, where: str) -> None:
    generic.check_exportable(model, where)
    q = model.qwen_vl
    if q is not None and q.mrope_interleaved != (q.version == "qwen3_vl"):
        raise generic.ConfigError(
            f"{where}.qwen_vl.mrope_interleaved: {str(q.mrope_interleaved).lower()} cannot be "
            f"exported as {q.version}: transformers' Qwen3-VL always interleaves the t/h/w "
            "rotary frequencies, Qwen2.5-VL never does")


def export_config(model: ModelConfig, dtype: torch.dtype, tokens: generic.SpecialTokens) -> dict:
    if model.qwen_vl is not None:
        return qwen_vl_config.hf_qwen_vl_config(model, dtype, tokens)
    return generic.hf_config(model, dtype, tokens)


def copy_processor_files(src: Path | None, dst: Path) -> list[str]:
    """Media-processing files found beside the tokenizer (an imported Qwen-VL's processor)."""
    copied = []
    if src is None:
        return copied
    for name in PROCESSOR_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            (dst / name).write_bytes((src / name).read_bytes())
            copied.append(name)
    return copied


def write_processor_files(src: Path | None, dst: Path, model: ModelConfig) -> None:
    """An export's media-processing files: those imported with the tokenizer, else the image
    processor this project feeds the model with (``models.qwen_vl.processing``)."""
    copy_processor_files(src, dst)
    if model.qwen_vl is None:
        return
    for name, cfg in (("preprocessor_config.json", processor_config),
                      ("video_preprocessor_config.json", video_processor_config)):
        if not (dst / name).exists():
            (dst / name).write_text(json.dumps(cfg(model.qwen_vl), indent=2, sort_keys=True)
                                    + "\n")
