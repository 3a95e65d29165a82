"""Parameter mappings between this project's model (torch_dist keys) and Hugging Face names.

One :class:`ParamMap` per megatron checkpoint tensor. Keys are global (TP/PP-free) and, for
transformer layers, stacked over the layers on a leading axis — the form megatron's
``sharded_state_dict`` writes — so a converter reads or writes one layer at a time and never
needs the model. :func:`param_maps` is the single source of truth for every family:

==========================================  ===============================================
megatron (under ``model.``)                 Hugging Face (Qwen3 / Llama; LLaVA adds prefixes)
==========================================  ===============================================
language_model.embedding.word_embeddings    model.embed_tokens
decoder.layers.self_attention.linear_qkv    self_attn.{q,k,v}_proj (fused per query group)
  .layer_norm_weight                        input_layernorm
decoder.layers.self_attention.linear_proj   self_attn.o_proj
decoder.layers.self_attention.{q,k}_layernorm  self_attn.{q,k}_norm (Qwen3)
decoder.layers.self_attention.linear_qkv.bias  self_attn.{q,k,v}_proj.bias (Qwen2)
decoder.layers.mlp.linear_fc1               mlp.{gate,up}_proj (stacked [gate; up])
  .layer_norm_weight                        post_attention_layernorm
decoder.layers.mlp.linear_fc2               mlp.down_proj
decoder.final_layernorm                     model.norm
output_layer                                lm_head (absent when embeddings are tied)
vision_model.conv1 / class_token /          vision_tower.embeddings.patch_embedding /
  position_embeddings / ln_pre              class_embedding / position_embedding / pre_layrnorm
vision_model.decoder.layers.*               vision_tower.encoder.layers.{i}.* (CLIP)
vision_projection.encoder.linear_fc{1,2}    multi_modal_projector.linear_{1,2}
==========================================  ===============================================

The local (CPU) layer spec stores the decoder's input / pre-MLP RMSNorms under Transformer
Engine's fused names (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``), so
CPU and GPU checkpoints share keys; the ViT's LayerNorms likewise (``layer_norm_bias`` too).
Checkpoints written before the ViT got that key map used ``input_layernorm`` /
``pre_mlp_layernorm``: :attr:`ParamMap.alt_mcore` lists those names for readers.

HF CLIP has a ``post_layernorm`` that LLaVA never applies to image features (it only feeds the
pooled output); our ViT has none. Export writes it as the identity, import ignores it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from megatron_copd.config import ModelConfig
from megatron_copd.models.conversion import tensors

MODEL_PREFIX = "model."


# -- operations ---------------------------------------------------------------------------------


class Op:
    """How one layer's megatron tensor relates to its HF tensors (default: the same tensor)."""

    n_hf = 1

    def to_mcore(self, hf: list[torch.Tensor]) -> torch.Tensor:
        return hf[0]

    def to_hf(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [t]

    def hf_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        return [shape]


COPY = Op()


@dataclass(frozen=True)
class QKV(Op):
    num_query_groups: int
    heads_per_group: int
    head_dim: int
    n_hf = 3

    def to_mcore(self, hf):
        return tensors.fuse_qkv(*hf, self.num_query_groups)

    def to_hf(self, t):
        return list(tensors.split_qkv(t, self.num_query_groups, self.heads_per_group,
                                      self.head_dim))

    def hf_shapes(self, shape):
        rows = tensors.qkv_rows(self.num_query_groups, self.heads_per_group, self.head_dim)
        return [(r, *shape[1:]) for r in rows]


class GateUp(Op):
    n_hf = 2

    def to_mcore(self, hf):
        return tensors.fuse_gate_up(*hf)

    def to_hf(self, t):
        return list(tensors.split_gate_up(t))

    def hf_shapes(self, shape):
        return [(shape[0] // 2, *shape[1:])] * 2


class Reshape(Op):
    """Same values, different shape (CLIP's class embedding ``[h]`` vs megatron ``[1, 1, h]``)."""

    def __init__(self, hf_shape: tuple[int, ...]) -> None:
        self.hf_shape = hf_shape

    def to_mcore(self, hf):
        raise NotImplementedError  # needs the megatron shape: see ParamMap.to_mcore

    def to_hf(self, t):
        return [t.reshape(self.hf_shape)]

    def hf_shapes(self, shape):
        return [self.hf_shape]


GATE_UP = GateUp()


@dataclass(frozen=True)
class ParamMap:
    """One megatron checkpoint tensor and the HF tensors it is made of."""

    mcore: str
    """torch_dist key without the ``model.`` prefix."""
    hf: tuple[str, ...]
    """HF tensor names; ``{i}`` stands for the layer index."""
    shape: tuple[int, ...]
    """megatron shape of one layer's tensor (the stored tensor is ``[layers, *shape]``)."""
    layers: int = 0
    """0: a plain tensor; n: stacked over n transformer layers."""
    op: Op = COPY
    alt_mcore: tuple[str, ...] = ()

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return (self.layers, *self.shape) if self.layers else self.shape

    def hf_names(self, layer: int | None = None) -> list[str]:
        return [n.format(i=layer) for n in self.hf]

    def hf_shapes(self) -> list[tuple[int, ...]]:
        return self.op.hf_shapes(self.shape)

    def to_mcore(self, hf: list[torch.Tensor]) -> torch.Tensor:
        if isinstance(self.op, Reshape):
            return hf[0].reshape(self.shape)
        return self.op.to_mcore(hf)

    def to_hf(self, t: torch.Tensor) -> list[torch.Tensor]:
        return self.op.to_hf(t)


@dataclass(frozen=True)
class HFConstant:
    """An HF tensor our model has no counterpart for, written with a fixed value on export."""

    name: str
    shape: tuple[int, ...]
    value: float


# -- Hugging Face naming ------------------------------------------------------------------------


@dataclass(frozen=True)
class HFNames:
    """Where the parts of a model live in an HF state dict."""

    lm: str
    """Prefix of the decoder (``embed_tokens``, ``layers``, ``norm``)."""
    head: str
    """The output projection's full name."""
    vision: str = ""
    projector: str = ""


# What transformers 5 writes with save_pretrained (and so what export writes).
TEXT_NAMES = HFNames(lm="model.", head="lm_head.weight")
LLAVA_NAMES = HFNames(
    lm="language_model.model.",
    head="language_model.lm_head.weight",
    vision="vision_tower.",
    projector="multi_modal_projector.",
)
QWEN3_VL_NAMES = HFNames(lm="model.language_model.", head="lm_head.weight", vision="model.visual.")
# Qwen2.5-VL's published checkpoints (and transformers 5's save_pretrained) keep the older layout;
# the in-memory one (Qwen3-VL's) is accepted on import.
QWEN2_5_VL_NAMES = HFNames(lm="model.", head="lm_head.weight", vision="visual.")
QWEN_VL_NAMES = {"qwen3_vl": (QWEN3_VL_NAMES,), "qwen2_5_vl": (QWEN2_5_VL_NAMES, QWEN3_VL_NAMES)}
# Further layouts found in the wild, accepted on import: transformers' in-memory names, and
# llava-hf checkpoints written before CLIPVisionModel lost its ``vision_model`` level.
LLAVA_IMPORT_VARIANTS = (
    LLAVA_NAMES,
    HFNames("language_model.model.", "language_model.lm_head.weight",
            "vision_tower.vision_model.", "multi_modal_projector."),
    HFNames("model.language_model.", "lm_head.weight", "model.vision_tower.",
            "model.multi_modal_projector."),
    HFNames("model.language_model.", "lm_head.weight", "model.vision_tower.vision_model.",
            "model.multi_modal_projector."),
)


# -- the mapping --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelMapping:
    params: tuple[ParamMap, ...]
    constants: tuple[HFConstant, ...] = ()
    ignored_hf: tuple[str, ...] = field(default=())
    """Regexes of HF tensors that import skips on purpose (not used by the HF model's forward
    for this configuration)."""

    def is_ignored(self, hf_name: str) -> bool:
        return any(re.fullmatch(p, hf_name) for p in self.ignored_hf)

    def hf_names(self) -> list[str]:
        names = []
        for p in self.params:
            for i in range(p.layers) if p.layers else [None]:
                names.extend(p.hf_names(i))
        return names


def param_maps(
    model: ModelConfig, names: HFNames, hf_vision_layers: int | None = None
) -> ModelMapping:
    """The mapping for ``model`` (a text LM, or a LLaVA VLM when ``model.vision`` is set).

    ``hf_vision_layers``: layers of the HF vision tower when it has more than ours (LLaVA picks
    an earlier layer's features; the later layers are ignored on import).
    """
    params = _lm_maps(model, names)
    constants: list[HFConstant] = []
    ignored = [re.escape(names.lm) + r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]
    if model.tie_embeddings:
        # Some tied checkpoints store the (identical) head anyway; transformers ignores it.
        ignored.append(re.escape(names.head))
    if model.vision is not None:
        params += _vision_maps(model, names)
        v = names.vision
        h = model.vision.hidden_size
        constants += [HFConstant(f"{v}post_layernorm.weight", (h,), 1.0),
                      HFConstant(f"{v}post_layernorm.bias", (h,), 0.0)]
        ignored += [re.escape(f"{v}post_layernorm.") + "(weight|bias)",
                    re.escape(f"{v}embeddings.position_ids")]
        ours = model.vision.num_layers
        if hf_vision_layers is not None and hf_vision_layers > ours:
            extra = "|".join(str(i) for i in range(ours, hf_vision_layers))
            ignored.append(re.escape(f"{v}encoder.layers.") + f"({extra})" + r"\..*")
    return ModelMapping(tuple(params), tuple(constants), tuple(ignored))


def _lm_maps(m: ModelConfig, names: HFNames) -> list[ParamMap]:
    h, d, L = m.hidden_size, m.head_dim, m.num_layers
    ng, hpg = m.num_query_groups, m.num_attention_heads // m.num_query_groups
    lm, layer = "language_model.", "language_model.decoder.layers."
    hl = names.lm + "layers.{i}."
    qkv = QKV(ng, hpg, d)
    maps = [
        ParamMap(lm + "embedding.word_embeddings.weight", (names.lm + "embed_tokens.weight",),
                 (m.vocab_size, h)),
        ParamMap(layer + "self_attention.linear_qkv.layer_norm_weight",
                 (hl + "input_layernorm.weight",), (h,), L),
        ParamMap(layer + "self_attention.linear_qkv.weight",
                 tuple(hl + f"self_attn.{x}_proj.weight" for x in "qkv"),
                 ((hpg + 2) * ng * d, h), L, qkv),
        ParamMap(layer + "self_attention.linear_proj.weight", (hl + "self_attn.o_proj.weight",),
                 (h, m.num_attention_heads * d), L),
    ]
    if m.qkv_bias:  # Qwen2
        maps.append(ParamMap(layer + "self_attention.linear_qkv.bias",
                             tuple(hl + f"self_attn.{x}_proj.bias" for x in "qkv"),
                             ((hpg + 2) * ng * d,), L, qkv))
    if m.use_qk_norm:
        maps += [
            ParamMap(layer + "self_attention.q_layernorm.weight", (hl + "self_attn.q_norm.weight",),
                     (d,), L),
            ParamMap(layer + "self_attention.k_layernorm.weight", (hl + "self_attn.k_norm.weight",),
                     (d,), L),
        ]
    maps += [
        ParamMap(layer + "mlp.linear_fc1.layer_norm_weight",
                 (hl + "post_attention_layernorm.weight",), (h,), L),
        ParamMap(layer + "mlp.linear_fc1.weight",
                 (hl + "mlp.gate_proj.weight", hl + "mlp.up_proj.weight"),
                 (2 * m.ffn_hidden_size, h), L, GATE_UP),
        ParamMap(layer + "mlp.linear_fc2.weight", (hl + "mlp.down_proj.weight",),
                 (h, m.ffn_hidden_size), L),
        ParamMap(lm + "decoder.final_layernorm.weight", (names.lm + "norm.weight",), (h,)),
    ]
    if not m.tie_embeddings:
        maps.append(ParamMap(lm + "output_layer.weight", (names.head,), (m.vocab_size, h)))
    return maps


def _vision_maps(m: ModelConfig, names: HFNames) -> list[ParamMap]:
    v = m.vision
    h, L, f = v.hidden_size, v.num_layers, v.ffn_hidden_size
    nh = v.num_attention_heads
    vm, layer = "vision_model.", "vision_model.decoder.layers."
    hv, hl = names.vision, names.vision + "encoder.layers.{i}."
    positions = (v.image_size // v.patch_size) ** 2 + (1 if v.class_token else 0)
    maps = [
        ParamMap(vm + "conv1.weight", (hv + "embeddings.patch_embedding.weight",),
                 (h, 3, v.patch_size, v.patch_size)),
    ]
    if v.class_token:
        maps.append(ParamMap(vm + "class_token", (hv + "embeddings.class_embedding",), (1, 1, h),
                             op=Reshape((h,))))
    maps += [
        ParamMap(vm + "position_embeddings.weight", (hv + "embeddings.position_embedding.weight",),
                 (positions, h)),
        ParamMap(vm + "ln_pre.weight", (hv + "pre_layrnorm.weight",), (h,)),
        ParamMap(vm + "ln_pre.bias", (hv + "pre_layrnorm.bias",), (h,)),
    ]
    qkv = QKV(nh, 1, h // nh)
    for ours, theirs, shape, op, old in [
        ("self_attention.linear_qkv.layer_norm_weight", ("layer_norm1.weight",), (h,), COPY,
         "input_layernorm.weight"),
        ("self_attention.linear_qkv.layer_norm_bias", ("layer_norm1.bias",), (h,), COPY,
         "input_layernorm.bias"),
        ("self_attention.linear_qkv.weight", tuple(f"self_attn.{x}_proj.weight" for x in "qkv"),
         (3 * h, h), qkv, None),
        ("self_attention.linear_qkv.bias", tuple(f"self_attn.{x}_proj.bias" for x in "qkv"),
         (3 * h,), qkv, None),
        ("self_attention.linear_proj.weight", ("self_attn.out_proj.weight",), (h, h), COPY, None),
        ("self_attention.linear_proj.bias", ("self_attn.out_proj.bias",), (h,), COPY, None),
        ("mlp.linear_fc1.layer_norm_weight", ("layer_norm2.weight",), (h,), COPY,
         "pre_mlp_layernorm.weight"),
        ("mlp.linear_fc1.layer_norm_bias", ("layer_norm2.bias",), (h,), COPY,
         "pre_mlp_layernorm.bias"),
        ("mlp.linear_fc1.weight", ("mlp.fc1.weight",), (f, h), COPY, None),
        ("mlp.linear_fc1.bias", ("mlp.fc1.bias",), (f,), COPY, None),
        ("mlp.linear_fc2.weight", ("mlp.fc2.weight",), (h, f), COPY, None),
        ("mlp.linear_fc2.bias", ("mlp.fc2.bias",), (h,), COPY, None),
    ]:
        maps.append(ParamMap(layer + ours, tuple(hl + t for t in theirs), shape, L, op,
                             (layer + old,) if old else ()))
    proj, hp = "vision_projection.encoder.", names.projector
    lm_h = m.hidden_size
    maps += [
        ParamMap(proj + "linear_fc1.weight", (hp + "linear_1.weight",), (lm_h, h)),
        ParamMap(proj + "linear_fc1.bias", (hp + "linear_1.bias",), (lm_h,)),
        ParamMap(proj + "linear_fc2.weight", (hp + "linear_2.weight",), (lm_h, lm_h)),
        ParamMap(proj + "linear_fc2.bias", (hp + "linear_2.bias",), (lm_h,)),
    ]
    return maps


def extra_state_keys(model: ModelConfig) -> list[str]:
    """The non-tensor ``_extra_state`` entries megatron's linear layers write (None for local
    layers), as torch_dist keys without the prefix: ``<module>._extra_state/shard_<i>_<n>``."""
    keys = []
    lm = "language_model.decoder.layers."
    mods = ["self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
            "mlp.linear_fc2"]
    for i in range(model.num_layers):
        keys += [f"{lm}{mod}._extra_state/shard_{i}_{model.num_layers}" for mod in mods]
    if model.vision is not None:
        n = model.vision.num_layers
        for i in range(n):
            keys += [f"vision_model.decoder.layers.{mod}._extra_state/shard_{i}_{n}"
                     for mod in mods]
        keys += [f"vision_projection.encoder.linear_fc{j}._extra_state/shard_0_1" for j in (1, 2)]
    return keys
