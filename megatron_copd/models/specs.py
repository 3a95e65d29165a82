"""Layer specs: Transformer Engine layers on CUDA machines with TE, megatron's local layers
otherwise (always on CPU, also when TE happens to be installed).

Attention masks. Training and scoring rows start at column 0 and pass no mask: causal
attention is exact, the TE layer keeps its declared causal type (flash / cuDNN) and the local
layer runs torch's SDPA (``models/sdpa_attention.py``). Rollout batches are left-padded
(``rollout.layout``): prefill carries an explicit ``[B, 1, P, P]`` mask (True = masked) and
decode steps ``[B, 1, 1, L]`` key-padding masks. TE's fused/flash kernels only take causal or
right-padding masks (cu_seqlens), which cannot express left padding, and megatron switches the
decode-step mask type to ``no_mask`` (ignoring the mask). So the TE decoder layer uses
:func:`masked_te_attention`: whenever a mask is given, TE runs the ``arbitrary`` mask type (its
unfused kernel: exact, but O(T^2) memory and no flash); with no mask the declared type is kept.
docs/GPU.md discusses the cost.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_copd.config import ConfigError, PrecisionConfig


def te_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def use_transformer_engine(precision: PrecisionConfig) -> bool:
    """Resolve precision.transformer_impl ('auto' | 'local' | 'transformer_engine')."""
    impl = precision.transformer_impl
    if impl == "local":
        if precision.fp8 is not None:
            raise ConfigError("precision.fp8: FP8 needs Transformer Engine layers, not "
                              "precision.transformer_impl='local'")
        return False
    if impl == "transformer_engine":
        if not te_available():
            raise ConfigError(
                "precision.transformer_impl: 'transformer_engine' needs CUDA and Transformer "
                "Engine (pip install 'megatron-copd[gpu]')"
            )
        return True
    return te_available()


def lm_layer_spec(qk_layernorm: bool, te: bool) -> ModuleSpec:
    """Decoder layer of the Qwen3/Llama family: RMSNorm, SwiGLU, GQA, optional QK-norm."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if te:
        spec = specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
        spec.submodules.self_attention.submodules.core_attention = masked_te_attention()
        return spec
    from megatron_copd.models.sdpa_attention import SDPADotProductAttention

    spec = specs.get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
    return spec


def effective_mask_type(attention_mask, declared: AttnMaskType) -> AttnMaskType:
    """The mask type TE must run for ``attention_mask``: ``arbitrary`` whenever an explicit
    mask is given (it is the whole truth about what may be attended), else the declared one."""
    return declared if attention_mask is None else AttnMaskType.arbitrary


@functools.cache
def masked_te_attention():
    """TEDotProductAttention that honours explicit masks (see the module docstring)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class MaskedTEDotProductAttention(TEDotProductAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type, *args, **kwargs):
            mask_type = effective_mask_type(attention_mask, attn_mask_type)
            return super().forward(query, key, value, attention_mask, mask_type, *args, **kwargs)

    return MaskedTEDotProductAttention


def vit_layer_spec(te: bool, rms_norm: bool = False) -> ModuleSpec:
    """ViT layer: TE's fused layers, or megatron's local ones (norms follow the config's
    ``normalization``; ``rms_norm`` makes them torch's, which has RMSNorm, where megatron's
    local spec would pick apex's LayerNorm-only fused kernel)."""
    from megatron.core.models.vision import vit_layer_specs as specs

    if te:
        return specs.get_vit_layer_with_transformer_engine_spec()
    spec = specs.get_vit_layer_with_local_spec()
    if rms_norm:
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        spec.submodules.input_layernorm = WrappedTorchNorm
        spec.submodules.pre_mlp_layernorm = WrappedTorchNorm
    # Checkpoint the norms under Transformer Engine's fused names (as megatron's local GPT spec
    # does), so CPU- and GPU-saved VLM checkpoints have the same keys.
    spec.submodules.sharded_state_dict_keys_map = {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
    }
    return spec


def projector_submodules(te: bool):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    if te:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TERowParallelLinear,
        )

        return MLPSubmodules(linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear)
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def norm_impl(te: bool):
    """LayerNorm module for the ViT's ln_pre (CLIPViTModel's default is not CPU-safe)."""
    if te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return WrappedTorchNorm
