"""Hugging Face <-> megatron tensor names of the Qwen-VL family (``Qwen3VLForConditionalGeneration``
and ``Qwen2_5_VLForConditionalGeneration`` as transformers 5 saves them), in the
:mod:`models.conversion.mapping` form: one ParamMap per torch_dist key, transformer layers
stacked on a leading axis.

=============================================  ===============================================
megatron (under ``model.``)                    Hugging Face
=============================================  ===============================================
language_model.*                               model.language_model.* (Qwen3 / Qwen2 decoder)
vision_model.patch_weight / patch_bias         model.visual.patch_embed.proj.{weight,bias}
vision_model.pos_embed.weight                  model.visual.pos_embed.weight (Qwen3-VL)
vision_model.decoder.layers.*                  model.visual.blocks.{i}.* (qkv fused per head)
  .mlp.linear_fc1 (Qwen2.5-VL: [gate; up])     .mlp.linear_fc1 / .mlp.{gate,up}_proj
vision_model.merger.norm / .mlp.encoder.*      model.visual.merger.norm / linear_fc{1,2}
                                               (Qwen2.5-VL: merger.ln_q / merger.mlp.{0,2})
vision_model.deepstack_merger{k}.*            model.visual.deepstack_merger_list.{k}.*
=============================================  ===============================================
"""

from __future__ import annotations

import torch

from megatron_copd.config import ModelConfig
from megatron_copd.models.conversion import mapping as mp
from megatron_copd.models.conversion import tensors
from megatron_copd.models.qwen_vl.spec import QwenVisionSpec


class PackedQKV(mp.Op):
    """HF's one ``qkv`` tensor ([Q; K; V] blocks) <-> megatron's per-head [q_h; k_h; v_h]."""

    def __init__(self, heads: int, head_dim: int) -> None:
        self.heads, self.head_dim = heads, head_dim

    def to_mcore(self, hf):
        return tensors.fuse_qkv(*torch.chunk(hf[0], 3, dim=0), self.heads)

    def to_hf(self, t):
        return [torch.cat(tensors.split_qkv(t, self.heads, 1, self.head_dim), dim=0)]


def qwen_vl_maps(model: ModelConfig, spec: QwenVisionSpec,
                 names: mp.HFNames | None = None) -> mp.ModelMapping:
    """Every tensor of a Qwen-VL model: the decoder's maps plus the vision tower's. ``names``:
    the HF layout (default: what transformers' save_pretrained writes for the version)."""
    names = names or mp.QWEN_VL_NAMES[spec.version][0]
    text = mp.param_maps(model, names)
    tower = _qwen3_vision if spec.qwen3 else _qwen2_5_vision
    vision = tower(spec, names.vision)
    return mp.ModelMapping(text.params + tuple(vision), text.constants, text.ignored_hf)


def _layers(spec: QwenVisionSpec, hv: str, rows) -> list[mp.ParamMap]:
    layer, hl = "vision_model.decoder.layers.", hv + "blocks.{i}."
    return [mp.ParamMap(layer + ours, tuple(hl + t for t in theirs), shape, spec.depth, op)
            for ours, theirs, shape, op in rows]


def _attention(spec: QwenVisionSpec) -> list:
    h = spec.hidden_size
    qkv = PackedQKV(spec.num_heads, spec.head_dim)
    return [
        ("self_attention.linear_qkv.layer_norm_weight", ("norm1.weight",), (h,), mp.COPY),
        ("self_attention.linear_qkv.weight", ("attn.qkv.weight",), (3 * h, h), qkv),
        ("self_attention.linear_qkv.bias", ("attn.qkv.bias",), (3 * h,), qkv),
        ("self_attention.linear_proj.weight", ("attn.proj.weight",), (h, h), mp.COPY),
        ("self_attention.linear_proj.bias", ("attn.proj.bias",), (h,), mp.COPY),
        ("mlp.linear_fc1.layer_norm_weight", ("norm2.weight",), (h,), mp.COPY),
    ]


def _patch(spec: QwenVisionSpec, hv: str) -> mp.ParamMap:
    kernel = (spec.in_channels, spec.temporal_patch_size, spec.patch_size, spec.patch_size)
    return mp.ParamMap("vision_model.patch_weight", (hv + "patch_embed.proj.weight",),
                       (spec.hidden_size, *kernel))


def _merger(ours: str, theirs: str, norm: tuple[str, int], fc1: str, fc2: str, u: int,
            out: int, norm_bias: bool) -> list[mp.ParamMap]:
    norm_name, width = norm
    maps = [mp.ParamMap(ours + "norm.weight", (theirs + norm_name + ".weight",), (width,))]
    if norm_bias:
        maps.append(mp.ParamMap(ours + "norm.bias", (theirs + norm_name + ".bias",), (width,)))
    return maps + [
        mp.ParamMap(ours + "mlp.encoder.linear_fc1.weight", (theirs + fc1 + ".weight",), (u, u)),
        mp.ParamMap(ours + "mlp.encoder.linear_fc1.bias", (theirs + fc1 + ".bias",), (u,)),
        mp.ParamMap(ours + "mlp.encoder.linear_fc2.weight", (theirs + fc2 + ".weight",), (out, u)),
        mp.ParamMap(ours + "mlp.encoder.linear_fc2.bias", (theirs + fc2 + ".bias",), (out,)),
    ]


def _qwen3_vision(spec: QwenVisionSpec, hv: str) -> list[mp.ParamMap]:
    h, f = spec.hidden_size, spec.intermediate_size
    u = spec.merge_unit * h
    vm = "vision_model."
    maps = [
        _patch(spec, hv),
        mp.ParamMap(vm + "patch_bias", (hv + "patch_embed.proj.bias",), (h,)),
        mp.ParamMap(vm + "pos_embed.weight", (hv + "pos_embed.weight",),
                    (spec.num_position_embeddings, h)),
    ]
    maps += _layers(spec, hv, _attention(spec) + [
        ("self_attention.linear_qkv.layer_norm_bias", ("norm1.bias",), (h,), mp.COPY),
        ("mlp.linear_fc1.layer_norm_bias", ("norm2.bias",), (h,), mp.COPY),
        ("mlp.linear_fc1.weight", ("mlp.linear_fc1.weight",), (f, h), mp.COPY),
        ("mlp.linear_fc1.bias", ("mlp.linear_fc1.bias",), (f,), mp.COPY),
        ("mlp.linear_fc2.weight", ("mlp.linear_fc2.weight",), (h, f), mp.COPY),
        ("mlp.linear_fc2.bias", ("mlp.linear_fc2.bias",), (h,), mp.COPY),
    ])
    out = spec.out_hidden_size
    maps += _merger(vm + "merger.", hv + "merger.", ("norm", h), "linear_fc1", "linear_fc2", u,
                    out, norm_bias=True)
    for k in range(len(spec.deepstack_visual_indexes)):
        maps += _merger(f"{vm}deepstack_merger{k}.", f"{hv}deepstack_merger_list.{k}.",
                        ("norm", u), "linear_fc1", "linear_fc2", u, out, norm_bias=True)
    return maps


def _qwen2_5_vision(spec: QwenVisionSpec, hv: str) -> list[mp.ParamMap]:
    h, f = spec.hidden_size, spec.intermediate_size
    u = spec.merge_unit * h
    maps = [_patch(spec, hv)]
    maps += _layers(spec, hv, _attention(spec) + [
        ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), (2 * f, h),
         mp.GATE_UP),
        ("mlp.linear_fc1.bias", ("mlp.gate_proj.bias", "mlp.up_proj.bias"), (2 * f,),
         mp.GATE_UP),
        ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), (h, f), mp.COPY),
        ("mlp.linear_fc2.bias", ("mlp.down_proj.bias",), (h,), mp.COPY),
    ])
    maps += _merger("vision_model.merger.", hv + "merger.", ("ln_q", h), "mlp.0",
                    "mlp.2", u, spec.out_hidden_size, norm_bias=False)
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
