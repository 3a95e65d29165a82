"""What a Qwen-VL model's vision side and multimodal RoPE look like, read from HF's config.

The language half is a Qwen3 decoder and uses the project's :class:`ModelConfig`; this module adds
what the Qwen-VL family needs beyond it. Options this implementation does not cover are refused
with one line naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_copd.config import ConfigError


@dataclass(frozen=True)
class QwenVisionSpec:
    """Qwen3-VL vision encoder (``Qwen3VLVisionConfig``) and the token ids that carry media."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    """Width of the merged tokens: the language model's hidden size."""
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    num_position_embeddings: int = 2304
    """Learned positions: a square table, bilinearly resampled to each image's patch grid."""
    deepstack_visual_indexes: tuple[int, ...] = ()
    """Vision layers whose (merged) output is added to decoder layer k's output, k = 0, 1, ..."""
    rope_theta: float = 10000.0
    layer_norm_epsilon: float = 1e-6
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    """Rotary frequency pairs driven by the t, h and w position components."""
    mrope_interleaved: bool = True
    """Qwen3-VL: the t/h/w frequencies alternate (t h w t h w ...) instead of three blocks."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch row of ``pixel_values``: channels x frames x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def grid_per_side(self) -> int:
        return int(round(self.num_position_embeddings**0.5))


def vision_spec_from_hf(cfg: dict[str, Any], where: str = "config.json") -> QwenVisionSpec:
    """A ``Qwen3VLConfig`` dict (``config.json`` or ``Qwen3VLConfig.to_dict()``) -> spec."""
    v = cfg.get("vision_config")
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: field 'vision_config' is missing")
    vw = f"{where}: vision_config"
    act = v.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"{vw}.hidden_act={act!r} is not supported; expected 'gelu_pytorch_tanh'")
    rope = dict(v.get("rope_parameters") or {"rope_type": "axial", "rope_theta": 10000.0})
    if rope.get("rope_type", "axial") != "axial":
        raise ConfigError(f"{vw}.rope_parameters.rope_type={rope['rope_type']!r} is not "
                          "supported; expected 'axial'")
    text = cfg.get("text_config") or {}
    trope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    section = tuple(int(x) for x in trope.get("mrope_section", (24, 20, 20)))
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    if len(section) != 3 or 2 * sum(section) != head_dim:
        raise ConfigError(f"{where}: text_config.rope_parameters.mrope_section={list(section)} "
                          f"must have 3 entries summing to head_dim / 2 = {head_dim // 2}")
    spec = QwenVisionSpec(
        depth=int(v["depth"]),
        hidden_size=int(v["hidden_size"]),
        num_heads=int(v["num_heads"]),
        intermediate_size=int(v["intermediate_size"]),
        out_hidden_size=int(v["out_hidden_size"]),
        patch_size=_int(v, "patch_size", 16, vw),
        temporal_patch_size=_int(v, "temporal_patch_size", 2, vw),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        in_channels=int(v.get("in_channels", 3)),
        num_position_embeddings=int(v.get("num_position_embeddings", 2304)),
        deepstack_visual_indexes=tuple(int(i) for i in v.get("deepstack_visual_indexes", ())),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        image_token_id=int(cfg.get("image_token_id", 151655)),
        video_token_id=int(cfg.get("video_token_id", 151656)),
        vision_start_token_id=int(cfg.get("vision_start_token_id", 151652)),
        mrope_section=section,  # type: ignore[arg-type]
        mrope_interleaved=bool(trope.get("mrope_interleaved", True)),
    )
    check_vision_spec(spec, int(text.get("hidden_size", spec.out_hidden_size)), where)
    return spec


def _int(v: dict, key: str, default: int, where: str) -> int:
    value = v.get(key, default)
    if not isinstance(value, int):
        raise ConfigError(f"{where}.{key}={value!r} is not supported; expected one integer "
                          "(square patches)")
    return value


def check_vision_spec(spec: QwenVisionSpec, lm_hidden: int, where: str) -> None:
    if spec.hidden_size % spec.num_heads or spec.head_dim % 4:
        raise ConfigError(f"{where}: vision_config.num_heads={spec.num_heads} must divide "
                          f"hidden_size={spec.hidden_size} into heads of a multiple of 4 "
                          "(2-D rotary embedding)")
    if spec.grid_per_side**2 != spec.num_position_embeddings:
        raise ConfigError(f"{where}: vision_config.num_position_embeddings="
                          f"{spec.num_position_embeddings} must be a square number")
    if spec.out_hidden_size != lm_hidden:
        raise ConfigError(f"{where}: vision_config.out_hidden_size={spec.out_hidden_size} must "
                          f"equal text_config.hidden_size={lm_hidden}")
    bad = [i for i in spec.deepstack_visual_indexes if not 0 <= i < spec.depth]
    if bad:
        raise ConfigError(f"{where}: vision_config.deepstack_visual_indexes {bad} lie outside "
                          f"the {spec.depth} vision layers")
