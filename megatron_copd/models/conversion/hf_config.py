"""Hugging Face ``config.json`` <-> this project's :class:`ModelConfig`, both directions.

Works on plain JSON mappings (no transformers import needed to convert). Supported:

- ``Qwen3ForCausalLM`` (``qwen3``) and ``LlamaForCausalLM`` (``llama``): dense decoders with
  RMSNorm, SwiGLU, GQA, plain RoPE, no biases; Qwen3 adds QK-norm.
- ``LlavaForConditionalGeneration`` (``llava``) with a CLIP vision tower (``clip_vision_model``,
  exact GELU, LayerNorm eps 1e-5), a 2-layer GELU projector with biases, and a Qwen3 or Llama
  text model; image features taken from one vision layer with the class token kept
  (``vision_feature_select_strategy: full``). An earlier feature layer than the last is
  imported by dropping the vision layers after it (their output is never used).

- the language model of ``Qwen3VLForConditionalGeneration`` (``qwen3_vl``, text-only import);
  the whole Qwen3-VL is the ``models/qwen_vl`` family's (``conversion.families`` dispatches).

Anything else is refused with one line naming the field and what is supported. Exporting a model
whose ViT has no class token is refused too: HF CLIP always prepends one and every other token
attends to it, so no transformers CLIP tower computes what our class-token-free ViT computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from megatron_copd.config import ModelConfig, VisionConfig
from megatron_copd.config_base import ConfigError

TEXT_ARCHS = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
              "qwen2": "Qwen2ForCausalLM"}
LLAVA_ARCH = "LlavaForConditionalGeneration"
SUPPORTED = ("Qwen3ForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM, LlavaForConditionalGeneration "
             "(CLIP + Qwen3/Llama), Qwen3VLForConditionalGeneration (dense), "
             "Qwen2_5_VLForConditionalGeneration")
CLIP_LN_EPS = 1e-5  # our ViT's LayerNorm epsilon (models.factory.vision_transformer_config)
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# ModelConfig.extra keys that do not change what the model computes (fusions, memory).
NEUTRAL_EXTRA = {"apply_rope_fusion", "bias_activation_fusion", "bias_dropout_fusion",
                 "masked_softmax_fusion", "persist_layer_norm", "gradient_accumulation_fusion",
                 "recompute_granularity", "recompute_method", "recompute_num_layers",
                 "cpu_offloading", "deallocate_pipeline_outputs"}


@dataclass
class HFModelInfo:
    """What an HF config says, in this project's terms."""

    model: ModelConfig
    architecture: str
    image_token_id: int | None = None
    hf_vision_layers: int | None = None
    """Layers of the HF vision tower (>= model.vision.num_layers)."""
    dtype: torch.dtype | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @property
    def is_vlm(self) -> bool:
        return self.model.vision is not None


# -- HF -> ours ---------------------------------------------------------------------------------


def model_config_from_hf(
    cfg: dict[str, Any], where: str = "config.json", text_only: bool = False
) -> HFModelInfo:
    """Translate an HF ``config.json`` mapping; ConfigError (one line) when unsupported.

    ``text_only``: take only the language model of a VLM (LLaVA, or Qwen3-VL, whose language
    model on text equals a Qwen3 decoder: its multimodal RoPE gives text tokens the same
    position in all three sections, which is plain RoPE)."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type in QWEN_VL_DECODERS:
        if not text_only:
            raise ConfigError(
                f"{where}: model_type {model_type!r}: this reads its language model only "
                f"(text_only); the whole model is read by conversion.families"
            )
        return qwen_vl_text(cfg, where)
    if model_type == "qwen3_vl_moe":
        raise ConfigError(
            f"{where}: model_type 'qwen3_vl_moe' is not supported: its decoder is a mixture of "
            f"experts (this project trains dense decoders); supported: {SUPPORTED}"
        )
    if model_type == "qwen2_vl":
        raise ConfigError(
            f"{where}: model_type 'qwen2_vl' is not supported (Qwen2-VL's vision tower differs "
            f"from Qwen2.5-VL's: LayerNorm, no windows); supported: {SUPPORTED}"
        )
    if model_type == "llava":
        if archs and archs[0] != LLAVA_ARCH:
            raise ConfigError(f"{where}: architectures {archs}: expected [{LLAVA_ARCH!r}]")
        info = _llava_from_hf(cfg, where)
        if text_only:
            info.model.vision, info.image_token_id, info.hf_vision_layers = None, None, None
        return info
    if model_type in TEXT_ARCHS:
        if archs and archs[0] != TEXT_ARCHS[model_type]:
            raise ConfigError(
                f"{where}: architectures {archs}: only {TEXT_ARCHS[model_type]!r} is supported "
                f"for model_type {model_type!r}"
            )
        model = _text_from_hf(cfg, where)
        return HFModelInfo(
            model=model,
            architecture=TEXT_ARCHS[model_type],
            dtype=_dtype(cfg, where),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
        )
    arch = archs[0] if archs else None
    raise ConfigError(
        f"{where}: architecture {arch!r} (model_type {model_type!r}) is not supported; "
        f"supported: {SUPPORTED}"
    )


# A Qwen-VL model_type -> (its decoder's model_type, its architecture).
QWEN_VL_DECODERS = {"qwen3_vl": ("qwen3", "Qwen3VLForConditionalGeneration"),
                    "qwen2_5_vl": ("qwen2", "Qwen2_5_VLForConditionalGeneration")}


def qwen_vl_text(cfg: dict, where: str) -> HFModelInfo:
    """The language model of a Qwen-VL config: a Qwen3 decoder (Qwen3-VL: QK-norm) or a Qwen2
    one (Qwen2.5-VL: Q/K/V bias). On text, its multimodal RoPE gives every section the same
    position: plain RoPE."""
    decoder, arch = QWEN_VL_DECODERS[cfg["model_type"]]
    text = dict(_require(cfg, "text_config", where))
    tw = f"{where}: text_config"
    text["model_type"] = decoder
    params = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    if params:
        # mrope_section / mrope_interleaved only matter for image and video positions
        params = {k: v for k, v in params.items() if not k.startswith("mrope")}
        params.setdefault("rope_theta", text.get("rope_theta", 10000.0))
        text["rope_parameters"] = params
        text.pop("rope_scaling", None)
    if "tie_word_embeddings" not in text and "tie_word_embeddings" in cfg:
        text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    return HFModelInfo(
        model=_text_from_hf(text, tw),
        architecture=arch,
        dtype=_dtype(cfg, where) or _dtype(text, tw),
        bos_token_id=text.get("bos_token_id", cfg.get("bos_token_id")),
        eos_token_id=text.get("eos_token_id", cfg.get("eos_token_id")),
        pad_token_id=text.get("pad_token_id", cfg.get("pad_token_id")),
    )


def _require(cfg: dict, key: str, where: str) -> Any:
    if cfg.get(key) is None:
        raise ConfigError(f"{where}: field {key!r} is missing")
    return cfg[key]


def _expect(cfg: dict, key: str, allowed: tuple, where: str, why: str, default: Any = None):
    value = cfg.get(key, default)
    if value not in allowed:
        raise ConfigError(
            f"{where}: {key}={value!r} is not supported ({why}); expected "
            f"{' or '.join(repr(a) for a in allowed)}"
        )
    return value


def _rope_theta(cfg: dict, where: str) -> float:
    params = cfg.get("rope_parameters")
    if params is None:  # transformers 4.x layout
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(
            f"{where}: rope type {rope_type!r} is not supported (plain RoPE only; no "
            f"llama3/yarn/linear/dynamic scaling)"
        )
    if isinstance(params.get("partial_rotary_factor"), (int, float)) and (
        params["partial_rotary_factor"] != 1.0
    ):
        raise ConfigError(f"{where}: partial_rotary_factor != 1 is not supported")
    theta = float(params.get("rope_theta", 10000.0))
    if theta != int(theta):
        # models.factory passes an integer rotary_base to megatron
        raise ConfigError(f"{where}: rope_theta={theta} is not an integer")
    return theta


def _text_from_hf(cfg: dict, where: str) -> ModelConfig:
    model_type = cfg["model_type"]
    _expect(cfg, "hidden_act", ("silu",), where, "the MLP is SwiGLU", "silu")
    if model_type != "qwen2":  # Qwen2: bias on Q/K/V always, none on the output projection
        _expect(cfg, "attention_bias", (False,), where, "attention projections have no bias",
                False)
    if model_type == "llama":
        _expect(cfg, "mlp_bias", (False,), where, "MLP projections have no bias", False)
    if model_type in ("qwen3", "qwen2"):
        _expect(cfg, "use_sliding_window", (False,), where, "full attention only", False)
    layer_types = cfg.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ConfigError(f"{where}: layer_types: only 'full_attention' layers are supported")
    hidden = int(_require(cfg, "hidden_size", where))
    heads = int(_require(cfg, "num_attention_heads", where))
    groups = int(cfg.get("num_key_value_heads") or heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    if heads % groups:
        raise ConfigError(
            f"{where}: num_key_value_heads={groups} does not divide num_attention_heads={heads}"
        )
    return ModelConfig(
        family=model_type,
        vocab_size=int(_require(cfg, "vocab_size", where)),
        hidden_size=hidden,
        num_layers=int(_require(cfg, "num_hidden_layers", where)),
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=None if head_dim * heads == hidden else int(head_dim),
        ffn_hidden_size=int(_require(cfg, "intermediate_size", where)),
        qk_layernorm=model_type == "qwen3",
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rotary_base=_rope_theta(cfg, where),
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        max_sequence_length=int(cfg.get("max_position_embeddings", 2048)),
        init_std=float(cfg.get("initializer_range", 0.02)),
    )


def _llava_from_hf(cfg: dict, where: str) -> HFModelInfo:
    text = dict(_require(cfg, "text_config", where))
    vision = dict(_require(cfg, "vision_config", where))
    text.setdefault("model_type", "llama")  # LlavaConfig's default text model
    tw, vw = f"{where}: text_config", f"{where}: vision_config"
    if text["model_type"] not in TEXT_ARCHS:
        raise ConfigError(
            f"{tw}: model_type {text['model_type']!r} is not supported; expected qwen3 or llama"
        )
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ConfigError(
            f"{vw}: model_type {vision.get('model_type')!r} is not supported; our ViT is "
            f"CLIP-shaped (expected 'clip_vision_model')"
        )
    _expect(vision, "hidden_act", ("gelu",), vw, "our ViT uses exact GELU", "quick_gelu")
    eps = float(vision.get("layer_norm_eps", 1e-5))
    if not math.isclose(eps, CLIP_LN_EPS):
        raise ConfigError(f"{vw}: layer_norm_eps={eps} is not supported; expected {CLIP_LN_EPS}")
    _expect(vision, "num_channels", (3,), vw, "RGB input", 3)
    _expect(cfg, "projector_hidden_act", ("gelu",), where, "the projector uses GELU", "gelu")
    _expect(cfg, "multimodal_projector_bias", (True,), where, "the projector has biases", True)
    _expect(cfg, "vision_feature_select_strategy", ("full",), where,
            "our VLM feeds every vision token, class token included, to the projector",
            "default")
    layers = int(_require(vision, "num_hidden_layers", vw))
    feature_layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(feature_layer, int):
        raise ConfigError(
            f"{where}: vision_feature_layer={feature_layer!r}: only a single layer is supported"
        )
    # hidden_states has layers + 1 entries (the embeddings first): layer k's output is [k].
    used = feature_layer + layers + 1 if feature_layer < 0 else feature_layer
    if not 1 <= used <= layers:
        raise ConfigError(
            f"{where}: vision_feature_layer={feature_layer} selects no transformer layer of the "
            f"{layers}-layer vision tower"
        )
    hidden = int(_require(vision, "hidden_size", vw))
    image_size, patch = int(_require(vision, "image_size", vw)), int(vision.get("patch_size", 32))
    if image_size % patch:
        raise ConfigError(f"{vw}: patch_size={patch} does not divide image_size={image_size}")
    model = _text_from_hf(text, tw)
    if "tie_word_embeddings" in text:
        model.tie_embeddings = bool(text["tie_word_embeddings"])
    model.vision = VisionConfig(
        image_size=image_size,
        patch_size=patch,
        hidden_size=hidden,
        num_layers=used,
        num_attention_heads=int(_require(vision, "num_attention_heads", vw)),
        ffn_hidden_size=int(_require(vision, "intermediate_size", vw)),
        class_token=True,
    )
    image_token = cfg.get("image_token_id", cfg.get("image_token_index"))
    if image_token is None:
        raise ConfigError(f"{where}: field 'image_token_id' is missing")
    return HFModelInfo(
        model=model,
        architecture=LLAVA_ARCH,
        image_token_id=int(image_token),
        hf_vision_layers=layers,
        dtype=_dtype(cfg, where) or _dtype(text, tw),
        bos_token_id=text.get("bos_token_id", cfg.get("bos_token_id")),
        eos_token_id=text.get("eos_token_id", cfg.get("eos_token_id")),
        pad_token_id=text.get("pad_token_id", cfg.get("pad_token_id")),
    )


def _dtype(cfg: dict, where: str) -> torch.dtype | None:
    name = cfg.get("dtype", cfg.get("torch_dtype"))
    if name is None:
        return None
    if name not in DTYPE_NAMES:
        raise ConfigError(f"{where}: dtype {name!r} is not supported; expected one of "
                          f"{sorted(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


# -- ours -> HF ---------------------------------------------------------------------------------


@dataclass
class SpecialTokens:
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    image_token_id: int | None = None


def check_exportable(model: ModelConfig, where: str = "copd_meta.json: model") -> None:
    odd = sorted(set(model.extra) - NEUTRAL_EXTRA)
    if odd:
        raise ConfigError(
            f"{where}.extra: {odd} change the model's computation in ways the HF architectures "
            f"cannot express; only {sorted(NEUTRAL_EXTRA)} may be set for export"
        )
    if model.rotary_base != int(model.rotary_base):
        raise ConfigError(f"{where}.rotary_base: {model.rotary_base} is not an integer")
    if model.qkv_bias and model.use_qk_norm:
        raise ConfigError(f"{where}.qk_layernorm: a qwen2 decoder with QK-norm has no Hugging "
                          "Face architecture (Qwen2 has none)")
    if model.vision is not None and not model.vision.class_token:
        raise ConfigError(
            f"{where}.vision.class_token: false cannot be exported: transformers' CLIP vision "
            f"tower always prepends a class token that every patch attends to, so it cannot "
            f"compute what this ViT computes (build VLMs with model.vision.class_token: true to "
            f"export them, or export the language model alone with --text-only)"
        )


def text_architecture(model: ModelConfig) -> tuple[str, str]:
    """(model_type, architecture) that computes exactly what ``model``'s decoder does: Qwen2
    with Q/K/V bias, Qwen3 with QK-norm, Llama with neither (they differ only in that)."""
    kind = "qwen2" if model.qkv_bias else "qwen3" if model.use_qk_norm else "llama"
    return kind, TEXT_ARCHS[kind]


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPE_NAMES.items()}[dtype]


def hf_text_config(model: ModelConfig, dtype: torch.dtype, tokens: SpecialTokens) -> dict:
    model_type, arch = text_architecture(model)
    cfg: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_sequence_length,
        "initializer_range": model.init_std,
        "rms_norm_eps": model.norm_epsilon,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(model.rotary_base)},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": model.tie_embeddings,
        "use_cache": True,
        "bos_token_id": tokens.bos_token_id,
        "eos_token_id": tokens.eos_token_id,
        "pad_token_id": tokens.pad_token_id,
        "dtype": _dtype_name(dtype),
    }
    if model_type == "llama":
        cfg["mlp_bias"] = False
    else:
        cfg["use_sliding_window"] = False
    if model_type == "qwen2":
        cfg.pop("attention_bias")  # Qwen2's attention always has its Q/K/V bias
    return cfg


def hf_config(model: ModelConfig, dtype: torch.dtype, tokens: SpecialTokens,
              text_only: bool = False) -> dict:
    """``config.json`` for ``model`` (call :func:`check_exportable` first)."""
    text = hf_text_config(model, dtype, tokens)
    if model.vision is None or text_only:
        return text
    if tokens.image_token_id is None:
        raise ConfigError("tokenizer: a VLM export needs the tokenizer's image token id")
    v = model.vision
    text.pop("architectures")
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.ffn_hidden_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_attention_heads,
        "num_channels": 3,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": "gelu",
        "layer_norm_eps": CLIP_LN_EPS,
        "attention_dropout": 0.0,
        "projection_dim": v.hidden_size,
    }
    return {
        "architectures": [LLAVA_ARCH],
        "model_type": "llava",
        "text_config": text,
        "vision_config": vision,
        "image_token_id": tokens.image_token_id,
        "image_seq_length": v.tokens_per_image,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "tie_word_embeddings": model.tie_embeddings,
        "dtype": _dtype_name(dtype),
    }


def generation_config(tokens: SpecialTokens) -> dict:
    cfg: dict[str, Any] = {"do_sample": True, "temperature": 1.0, "top_p": 1.0}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokens, k) is not None:
            cfg[k] = getattr(tokens, k)
    return cfg
