"""The one model factory: RunConfig + this rank's process groups -> a CopdModel stage.

Text LM and VLM are the same class (the VLM simply has a vision tower); a Qwen3-VL-shaped model
(``model.qwen_vl``) comes from its family folder, ``models/qwen_vl``. Layer implementations
come from ``specs`` (Transformer Engine on GPU, local layers on CPU); precision and FP8 settings
from ``precision``; all megatron groups from the branch's ProcessGroupCollection, never from
megatron's global parallel_state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_copd.config import RunConfig
from megatron_copd.models import specs
from megatron_copd.models.language_model import LanguageModel
from megatron_copd.models.qwen_vl.model import build_qwen_vl
from megatron_copd.models.transformer_configs import (  # noqa: F401 - re-exported
    common_kwargs,
    drop_fp8,
    lm_transformer_config,
    resolve_dtype,
)
from megatron_copd.models.vlm import CopdModel


def vision_transformer_config(cfg: RunConfig, te: bool) -> TransformerConfig:
    v = cfg.model.vision
    kw = common_kwargs(cfg.parallel, cfg.precision, te)
    # The vision tower is not pipelined: it lives whole on the first stage.
    kw.update(
        pipeline_model_parallel_size=1,
        num_layers=v.num_layers,
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_attention_heads,
        ffn_hidden_size=v.ffn_hidden_size,
        kv_channels=v.hidden_size // v.num_attention_heads,
        normalization="LayerNorm",
        layernorm_epsilon=1e-5,
        gated_linear_unit=False,
        activation_func=F.gelu,
        add_bias_linear=True,
        add_qkv_bias=True,
        init_method_std=cfg.model.init_std,
        sequence_parallel=False,
    )
    drop_fp8(kw)  # vision GEMMs are small: keep them in BF16
    return TransformerConfig(**kw)


def projector_transformer_config(cfg: RunConfig, te: bool) -> TransformerConfig:
    kw = common_kwargs(cfg.parallel, cfg.precision, te)
    kw.update(
        num_layers=1,
        hidden_size=cfg.model.hidden_size,
        num_attention_heads=cfg.parallel.tp,  # unused by the projector; must divide by TP
        ffn_hidden_size=cfg.model.hidden_size,
        gated_linear_unit=False,
        activation_func=F.gelu,
        add_bias_linear=True,
        init_method_std=cfg.model.init_std,
        sequence_parallel=False,
    )
    drop_fp8(kw)
    return TransformerConfig(**kw)


def build_model(
    cfg: RunConfig,
    pgs: ProcessGroupCollection,
    image_token_id: int | None = None,
    pp_rank: int | None = None,
) -> CopdModel:
    """Build this rank's pipeline stage of the branch model (weights initialised from the RNG;
    load a checkpoint to get real weights)."""
    if cfg.model.qwen_vl is not None:
        return build_qwen_vl(cfg, pgs, pp_rank)
    te = specs.use_transformer_engine(cfg.precision)
    pp_rank = pgs.pp.rank() if pp_rank is None else pp_rank
    pp_size = pgs.pp.size()
    pre, post = pp_rank == 0, pp_rank == pp_size - 1
    m = cfg.model
    lm_config = lm_transformer_config(cfg, te)
    language_model = LanguageModel(
        config=lm_config,
        transformer_layer_spec=specs.lm_layer_spec(m.use_qk_norm, te),
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_sequence_length,
        pre_process=pre,
        post_process=post,
        parallel_output=True,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(m.rotary_base),
        scatter_embedding_sequence_parallel=False,
        pg_collection=pgs,
    )
    vision_model = projection = None
    if m.vision is not None and pre:
        if image_token_id is None:
            raise ValueError("a vision model needs the tokenizer's image token id")
        v = m.vision
        vcfg = vision_transformer_config(cfg, te)
        vision_model = CLIPViTModel(
            vcfg,
            specs.vit_layer_spec(te),
            ln_pre_impl=specs.norm_impl(te),
            ln_post_impl=specs.norm_impl(te),
            add_class_token=v.class_token,
            class_token_len=1,
            patch_dim=v.patch_size,
            img_h=v.image_size,
            img_w=v.image_size,
            model_subtype="clip",
            pg_collection=pgs,
        )
        # megatron leaves the ViT's position embeddings (and class token) at nn.Embedding's
        # N(0, 1) init, 50x the scale of everything else: they then dominate the patch content
        # (measured on the toy images: 97% of the ViT output variance was position, and the
        # projected image features barely differed between images), so a ViT trained from
        # scratch learns nothing from the pixels. Use the model's init_std like every other
        # weight. Same RNG stream on every rank of the branch, so TP ranks stay identical.
        with torch.no_grad():
            vision_model.position_embeddings.weight.normal_(0.0, m.init_std)
            if v.class_token:
                vision_model.class_token.normal_(0.0, m.init_std)
        projection = MultimodalProjector(
            projector_transformer_config(cfg, te),
            specs.projector_submodules(te),
            projector_type="mlp",
            input_size=v.hidden_size,
            pg_collection=pgs,
        )
    model = CopdModel(
        config=lm_config,
        language_model=language_model,
        vision_model=vision_model,
        vision_projection=projection,
        image_token_id=image_token_id,
        pg_collection=pgs,
        tokens_per_image=m.vision.tokens_per_image if m.vision is not None else None,
    )
    # Rollout / scoring forwards read this through models.precision.inference_precision.
    model.fp8_inference = cfg.precision.fp8 is not None and cfg.precision.fp8_rollout
    # Some megatron modules (CLIPViTModel) keep no `tp_group`; their sharded_state_dict then
    # falls back to the global parallel_state, which this project never initialises.
    for module in model.modules():
        if isinstance(module, MegatronModule) and getattr(module, "tp_group", None) is None:
            module.tp_group = pgs.tp
    return model
