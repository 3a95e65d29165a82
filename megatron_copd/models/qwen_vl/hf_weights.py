"""Hugging Face <-> megatron tensor names of the Qwen3-VL family (``Qwen3VLForConditionalGeneration``
as transformers 5 saves it), in the :mod:`models.conversion.mapping` form: one ParamMap per
torch_dist key, transformer layers stacked on a leading axis.

=============================================  ===============================================
megatron (under ``model.``)                    Hugging Face
=============================================  ===============================================
language_model.*                               model.language_model.* (a Qwen3 decoder)
vision_model.patch_weight / patch_bias         model.visual.patch_embed.proj.{weight,bias}
vision_model.pos_embed.weight                  model.visual.pos_embed.weight
vision_model.decoder.layers.*                  model.visual.blocks.{i}.* (qkv fused per head)
vision_model.merger.norm / .mlp.encoder.*      model.visual.merger.norm / linear_fc{1,2}
vision_model.deepstack_merger{k}.*            model.visual.deepstack_merger_list.{k}.*
=============================================  ===============================================
"""

from __future__ import annotations

import torch

from megatron_copd.config import ModelConfig
from megatron_copd.models.conversion import mapping as mp
from megatron_copd.models.conversion import tensors
from megatron_copd.models.qwen_vl.spec import QwenVisionSpec

NAMES = mp.QWEN3_VL_NAMES


class PackedQKV(mp.Op):
    """HF's one ``qkv`` tensor ([Q; K; V] blocks) <-> megatron's per-head [q_h; k_h; v_h]."""

    def __init__(self, heads: int, head_dim: int) -> None:
        self.heads, self.head_dim = heads, head_dim

    def to_mcore(self, hf):
        return tensors.fuse_qkv(*torch.chunk(hf[0], 3, dim=0), self.heads)

    def to_hf(self, t):
        return [torch.cat(tensors.split_qkv(t, self.heads, 1, self.head_dim), dim=0)]


def qwen3_vl_maps(model: ModelConfig, spec: QwenVisionSpec) -> mp.ModelMapping:
    """Every tensor of a Qwen3-VL model: the Qwen3 decoder's maps plus the vision tower's."""
    text = mp.param_maps(model, NAMES)
    return mp.ModelMapping(text.params + tuple(_vision_maps(spec)), text.constants,
                           text.ignored_hf)


def _vision_maps(spec: QwenVisionSpec) -> list[mp.ParamMap]:
    h, f, L = spec.hidden_size, spec.intermediate_size, spec.depth
    u = spec.merge_unit * h
    vm, hv = "vision_model.", NAMES.vision
    kernel = (spec.in_channels, spec.temporal_patch_size, spec.patch_size, spec.patch_size)
    maps = [
        mp.ParamMap(vm + "patch_weight", (hv + "patch_embed.proj.weight",), (h, *kernel)),
        mp.ParamMap(vm + "patch_bias", (hv + "patch_embed.proj.bias",), (h,)),
        mp.ParamMap(vm + "pos_embed.weight", (hv + "pos_embed.weight",),
                    (spec.num_position_embeddings, h)),
    ]
    layer, hl = vm + "decoder.layers.", hv + "blocks.{i}."
    qkv = PackedQKV(spec.num_heads, spec.head_dim)
    for ours, theirs, shape, op in [
        ("self_attention.linear_qkv.layer_norm_weight", "norm1.weight", (h,), mp.COPY),
        ("self_attention.linear_qkv.layer_norm_bias", "norm1.bias", (h,), mp.COPY),
        ("self_attention.linear_qkv.weight", "attn.qkv.weight", (3 * h, h), qkv),
        ("self_attention.linear_qkv.bias", "attn.qkv.bias", (3 * h,), qkv),
        ("self_attention.linear_proj.weight", "attn.proj.weight", (h, h), mp.COPY),
        ("self_attention.linear_proj.bias", "attn.proj.bias", (h,), mp.COPY),
        ("mlp.linear_fc1.layer_norm_weight", "norm2.weight", (h,), mp.COPY),
        ("mlp.linear_fc1.layer_norm_bias", "norm2.bias", (h,), mp.COPY),
        ("mlp.linear_fc1.weight", "mlp.linear_fc1.weight", (f, h), mp.COPY),
        ("mlp.linear_fc1.bias", "mlp.linear_fc1.bias", (f,), mp.COPY),
        ("mlp.linear_fc2.weight", "mlp.linear_fc2.weight", (h, f), mp.COPY),
        ("mlp.linear_fc2.bias", "mlp.linear_fc2.bias", (h,), mp.COPY),
    ]:
        maps.append(mp.ParamMap(layer + ours, (hl + theirs,), shape, L, op))
    mergers = [(vm + "merger.", hv + "merger.", h)]
    mergers += [(f"{vm}deepstack_merger{k}.", f"{hv}deepstack_merger_list.{k}.", u)
                for k in range(len(spec.deepstack_visual_indexes))]
    out = spec.out_hidden_size
    for ours, theirs, norm in mergers:
        maps += [
            mp.ParamMap(ours + "norm.weight", (theirs + "norm.weight",), (norm,)),
            mp.ParamMap(ours + "norm.bias", (theirs + "norm.bias",), (norm,)),
            mp.ParamMap(ours + "mlp.encoder.linear_fc1.weight", (theirs + "linear_fc1.weight",),
                        (u, u)),
            mp.ParamMap(ours + "mlp.encoder.linear_fc1.bias", (theirs + "linear_fc1.bias",), (u,)),
            mp.ParamMap(ours + "mlp.encoder.linear_fc2.weight", (theirs + "linear_fc2.weight",),
                        (out, u)),
            mp.ParamMap(ours + "mlp.encoder.linear_fc2.bias", (theirs + "linear_fc2.bias",),
                        (out,)),
        ]
    return maps


def mcore_tensors(maps: mp.ModelMapping, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Global (stacked) megatron tensors from an in-memory HF state dict."""
    out = {}
    for p in maps.params:
        if p.layers:
            out[p.mcore] = torch.stack([p.to_mcore([hf[n] for n in p.hf_names(i)])
                                        for i in range(p.layers)])
        else:
            out[p.mcore] = p.to_mcore([hf[n] for n in p.hf_names(None)])
    return out
