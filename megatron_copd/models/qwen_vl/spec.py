"""The shape of a Qwen-VL model's vision side, as the model code uses it: the run config's
``model.qwen_vl`` (:class:`QwenVLConfig`) plus what follows from the decoder (its width)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_copd.config import ModelConfig


@dataclass(frozen=True)
class QwenVisionSpec:
    """The Qwen3-VL / Qwen2.5-VL vision encoder and the token ids that carry media."""

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
    deepstack_visual_indexes: tuple[int, ...] = ()
    rope_theta: float = 10000.0
    layer_norm_epsilon: float = 1e-6
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    mrope_interleaved: bool = True
    version: str = "qwen3_vl"
    window_size: int = 112
    """Qwen2.5-VL: attention windows of this many pixels per side."""
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: float = 2.0

    @property
    def qwen3(self) -> bool:
        """Qwen3-VL (learned positions, DeepStack, LayerNorm/GELU) rather than Qwen2.5-VL."""
        return self.version == "qwen3_vl"

    @property
    def window_tokens(self) -> int:
        """Qwen2.5-VL: merged tokens per side of an attention window."""
        return self.window_size // (self.spatial_merge_size * self.patch_size)

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


def spec_from_model(m: ModelConfig) -> QwenVisionSpec:
    q = m.qwen_vl
    if q is None:
        raise ValueError("model.qwen_vl is not set")
    return QwenVisionSpec(
        depth=q.depth, hidden_size=q.hidden_size, num_heads=q.num_heads,
        intermediate_size=q.intermediate_size, out_hidden_size=m.hidden_size,
        patch_size=q.patch_size, temporal_patch_size=q.temporal_patch_size,
        spatial_merge_size=q.spatial_merge_size,
        num_position_embeddings=q.num_position_embeddings,
        deepstack_visual_indexes=tuple(q.deepstack_visual_indexes), rope_theta=q.rope_theta,
        image_token_id=q.image_token_id, video_token_id=q.video_token_id,
        vision_start_token_id=q.vision_start_token_id,
        vision_end_token_id=q.vision_end_token_id,
        mrope_section=tuple(q.mrope_section),  # type: ignore[arg-type]
        mrope_interleaved=q.mrope_interleaved, version=q.version, window_size=q.window_size,
        fullatt_block_indexes=tuple(q.fullatt_block_indexes),
        tokens_per_second=q.tokens_per_second)
