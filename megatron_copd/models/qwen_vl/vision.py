"""The Qwen-VL native-resolution vision encoders (Qwen3-VL, Qwen2.5-VL) on megatron-core blocks.

Patches (``pixel_values`` rows of 3 x 2 frames x P x P values, any number of images of any grid
in one packed sequence) -> patch embedding (Qwen's Conv3d with stride = kernel, i.e. one linear
map, kept in the Conv3d's weight shape; Qwen3-VL adds bilinearly resampled learned positions)
-> megatron transformer layers with 2-D RoPE inside attention -> the 2 x 2 patch merger into the
language model's width.

Qwen3-VL: LayerNorm, QKV with bias, tanh-GELU MLP; attention inside each frame; DeepStack: after
the listed layers a merger of its own (norm after the 2 x 2 shuffle) turns the hidden states
into features for the first decoder layers. Qwen2.5-VL: RMSNorm, SwiGLU MLP with biases;
attention inside windows of ``window_size`` pixels, except the ``fullatt_block_indexes`` layers,
which attend over the whole frame.

Attention segments (frames or windows) of equal length run as one batch ``[length, segments,
hidden]`` per layer, so no mask is needed, no attention crosses a segment, and memory grows with
the square of a segment, not of the whole batch of patches.

The tower is not pipelined: it lives whole on the first pipeline stage, tensor-parallel like
the decoder (heads and MLP split over TP, patch embedding and positions replicated).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from megatron_copd.models.qwen_vl import positions
from megatron_copd.models.qwen_vl.rope import vision_rope_angles
from megatron_copd.models.qwen_vl.spec import QwenVisionSpec

gelu_tanh = functools.partial(F.gelu, approximate="tanh")


class PatchMerger(MegatronModule):
    """LayerNorm + (2 x 2 patches -> one token) + MLP. ``postshuffle``: the norm runs over the
    concatenated 4 patches (DeepStack mergers) instead of over each patch (the final merger)."""

    def __init__(self, config: TransformerConfig, mlp_submodules, norm_impl, spec: QwenVisionSpec,
                 postshuffle: bool, pg_collection: ProcessGroupCollection) -> None:
        super().__init__(config=config)
        self.unit = spec.merge_unit * spec.hidden_size
        self.postshuffle = postshuffle
        self.norm = norm_impl(config=config, hidden_size=self.unit if postshuffle
                              else spec.hidden_size, eps=spec.layer_norm_epsilon)
        self.mlp = MultimodalProjector(config, mlp_submodules, "mlp", input_size=self.unit,
                                       pg_collection=pg_collection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle:
            x = self.norm(x.reshape(-1, self.unit))
        else:
            x = self.norm(x).reshape(-1, self.unit)
        return self.mlp(x)


class QwenVisionModel(MegatronModule):
    """``forward(pixel_values [patches, patch_dim], grid_thw [n, 3])`` ->
    (merged tokens ``[patches / 4, lm_hidden]``, DeepStack features: one such tensor per
    ``deepstack_visual_indexes`` entry)."""

    def __init__(self, spec: QwenVisionSpec, config: TransformerConfig, layer_spec: ModuleSpec,
                 merger_config: TransformerConfig, mlp_submodules, norm_impl,
                 pg_collection: ProcessGroupCollection) -> None:
        super().__init__(config=config)
        self.spec = spec
        h = spec.hidden_size
        kernel = (spec.temporal_patch_size, spec.patch_size, spec.patch_size)
        self.patch_weight = nn.Parameter(torch.empty(h, spec.in_channels, *kernel))
        with torch.no_grad():
            nn.init.normal_(self.patch_weight, 0.0, config.init_method_std)
        self.patch_bias = self.pos_embed = None  # Qwen2.5-VL has neither
        if spec.qwen3:
            self.patch_bias = nn.Parameter(torch.zeros(h))
            self.pos_embed = nn.Embedding(spec.num_position_embeddings, h)
            with torch.no_grad():
                nn.init.normal_(self.pos_embed.weight, 0.0, config.init_method_std)
        self.decoder = TransformerBlock(config=config, spec=layer_spec, post_layer_norm=False,
                                        pre_process=True, post_process=False,
                                        pg_collection=pg_collection)
        merger = functools.partial(PatchMerger, merger_config, mlp_submodules, norm_impl, spec,
                                   pg_collection=pg_collection)
        self.merger = merger(postshuffle=False)
        # Plain attributes, not an nn.ModuleList: megatron's sharded_state_dict treats a
        # ModuleList as an opaque module and would save the TP shards as replicated tensors.
        for k in range(len(spec.deepstack_visual_indexes)):
            setattr(self, f"deepstack_merger{k}", merger(postshuffle=True))

    @property
    def deepstack_mergers(self) -> list[PatchMerger]:
        return [getattr(self, f"deepstack_merger{k}")
                for k in range(len(self.spec.deepstack_visual_indexes))]

    def set_input_tensor(self, input_tensor) -> None:
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        spec = self.spec
        if pixel_values.dim() != 2 or pixel_values.shape[1] != spec.patch_dim:
            raise ValueError(f"pixel_values: expected [patches, {spec.patch_dim}] "
                             f"(3 x {spec.temporal_patch_size} x {spec.patch_size}^2 values per "
                             f"patch), got {list(pixel_values.shape)}")
        n = int(grid_thw.prod(-1).sum())
        if pixel_values.shape[0] != n:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but the grids "
                             f"{grid_thw.tolist()} need {n}")
        grid_thw = grid_thw.cpu()
        dev, dtype = self.patch_weight.device, self.patch_weight.dtype
        x = F.linear(pixel_values.to(device=dev, dtype=dtype),
                     self.patch_weight.reshape(spec.hidden_size, -1), self.patch_bias)
        if self.pos_embed is not None:
            idx, wts = positions.position_taps(grid_thw, spec.grid_per_side,
                                               spec.spatial_merge_size)
            x = x + (self.pos_embed(idx.to(dev)) * wts.to(dev, dtype)[..., None]).sum(1)
        rope = vision_rope_angles(positions.vision_rope_coords(grid_thw, spec.spatial_merge_size),
                                  spec.head_dim, spec.rope_theta).to(dev)[:, 0, 0]
        frames = _Segments(positions.frame_segments(grid_thw), dev)
        windows = frames if spec.qwen3 else _Segments(positions.window_segments(
            grid_thw, spec.spatial_merge_size, spec.window_tokens), dev)
        taps = []
        for i, layer in enumerate(self.decoder.layers):
            full = spec.qwen3 or i in spec.fullatt_block_indexes
            x = (frames if full else windows).run(layer, x, rope)
            if i in spec.deepstack_visual_indexes:
                taps.append(x)
        deepstack = [m(taps[spec.deepstack_visual_indexes.index(i)])
                     for m, i in zip(self.deepstack_mergers, spec.deepstack_visual_indexes)]
        return self.merger(x), deepstack


class _Segments:
    """Attention segments (each a list of patch indices), grouped by length: ``run`` applies a
    transformer layer to every segment at once, one batch ``[length, segments, hidden]`` per
    length, with each patch's rotary angles; no attention crosses a segment."""

    def __init__(self, segments: list[torch.Tensor], device: torch.device) -> None:
        by_length: dict[int, list[torch.Tensor]] = {}
        for seg in segments:
            by_length.setdefault(len(seg), []).append(seg)
        self.groups = [(n, torch.stack(segs).to(device)) for n, segs in by_length.items()]

    def run(self, layer, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        for n, idx in self.groups:  # idx [segments, n]
            xs = x[idx].transpose(0, 1)  # [n, segments, hidden]
            rs = rope[idx].transpose(0, 1).unsqueeze(2)  # [n, segments, 1, d]
            y, _ = layer(hidden_states=xs, attention_mask=None, rotary_pos_emb=rs)
            out[idx] = y.transpose(0, 1)
        return out
