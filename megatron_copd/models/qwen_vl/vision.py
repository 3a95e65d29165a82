"""Qwen3-VL's native-resolution vision encoder on megatron-core building blocks.

Patches (``pixel_values`` rows of 3 x 2 frames x 16 x 16 values, any number of images of any
grid in one packed sequence) -> patch embedding (Qwen's Conv3d with stride = kernel, i.e. one
linear map, kept in the Conv3d's weight shape) + bilinearly resampled learned positions ->
a megatron TransformerBlock (LayerNorm, QKV with bias, tanh-GELU MLP; 2-D RoPE inside attention;
attention inside each frame: frames of equal size run as one batch, so no mask is needed) ->
the 2 x 2 patch merger into the language model's width. DeepStack: after the listed vision layers, a merger of its own (norm after
the 2 x 2 shuffle) turns the hidden states into features for the first decoder layers.

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
        self.patch_bias = nn.Parameter(torch.zeros(h))
        self.pos_embed = nn.Embedding(spec.num_position_embeddings, h)
        with torch.no_grad():
            nn.init.normal_(self.patch_weight, 0.0, config.init_method_std)
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
        self._taps = {}
        for i in spec.deepstack_visual_indexes:
            self.decoder.layers[i].register_forward_hook(self._keep_output)

    def _keep_output(self, module, args, output) -> None:
        if self._taps is not None:
            self._taps[module.layer_number - 1] = output[0] if isinstance(output, tuple) else output

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
        idx, wts = positions.position_taps(grid_thw, spec.grid_per_side, spec.spatial_merge_size)
        pos = (self.pos_embed(idx.to(dev)) * wts.to(dev, dtype)[..., None]).sum(1)
        x = x + pos  # [patches, hidden]
        rope = vision_rope_angles(positions.vision_rope_coords(grid_thw, spec.spatial_merge_size),
                                  spec.head_dim, spec.rope_theta).to(dev)[:, 0, 0]
        x, taps = self._blocks(x, rope, positions.frame_lengths(grid_thw))
        deepstack = [m(t) for m, t in zip(self.deepstack_mergers, taps)]
        return self.merger(x), deepstack

    def _blocks(self, x: torch.Tensor, rope: torch.Tensor, lengths: list[int]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The transformer layers over every frame, attention inside each frame only.

        Frames of equal patch count run together as one batch ``[patches, frames, hidden]``
        (rotary angles per batch entry): no mask and no attention between frames, and memory
        grows with the square of a frame's patches, not of the whole batch's."""
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        by_length: dict[int, list[int]] = {}
        for f, n in enumerate(lengths):
            by_length.setdefault(n, []).append(f)
        order, outs, taps = [], [], []
        for n, frames in by_length.items():
            idx = torch.cat([torch.arange(starts[f], starts[f] + n) for f in frames]).to(x.device)
            order.append(idx)
            xs = x[idx].view(len(frames), n, -1).transpose(0, 1)  # [n, frames, hidden]
            rs = rope[idx].view(len(frames), n, 1, -1).transpose(0, 1)  # [n, frames, 1, d]
            self._taps = {}
            try:
                y = self.decoder(hidden_states=xs, attention_mask=None, rotary_pos_emb=rs)
                tapped = [self._taps[i] for i in self.spec.deepstack_visual_indexes]
            finally:
                self._taps = None
            outs.append(y.transpose(0, 1).reshape(len(frames) * n, -1))
            taps.append([t.transpose(0, 1).reshape(len(frames) * n, -1) for t in tapped])
        back = torch.argsort(torch.cat(order))  # grouped order -> patch order
        x = torch.cat(outs)[back]
        per_layer = [torch.cat([t[k] for t in taps])[back]
                     for k in range(len(self.spec.deepstack_visual_indexes))]
        return x, per_layer
