"""QwenVLModel: a Qwen3-VL-shaped model as one megatron model chunk.

The language model is the project's GPTModel (Qwen3 decoder) with multimodal RoPE: positions are
``[3, b, s]`` (t, h, w) ids from :func:`positions.mrope_position_ids`, turned into rotary angles
by :class:`rope.MultimodalRoPE` in place of GPTModel's own. Image and video-frame placeholders are
*expanded* in the token stream (one placeholder per merged token, as the HF processor writes
them), so sequence length, labels, log-probs and the KV cache stay aligned with the token ids.

DeepStack: the vision tower's DeepStack features travel to the decoder as the TransformerBlock's
``context`` argument (a ``[n, s, b, h]`` tensor, zero outside media positions) and
:class:`DeepStackLayer` adds entry k to decoder layer k's output. ``context`` is an argument of
every layer call, so activation recompute replays the addition exactly. DeepStack layers must lie
on the first pipeline stage (where the vision tower is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_copd.config import RunConfig, validate_qwen_vl
from megatron_copd.models import specs
from megatron_copd.models.language_model import LanguageModel
from megatron_copd.models.qwen_vl.media import QwenVisualInputs
from megatron_copd.models.qwen_vl.rope import MultimodalRoPE
from megatron_copd.models.qwen_vl.spec import QwenVisionSpec, spec_from_model
from megatron_copd.models.qwen_vl.vision import QwenVisionModel, gelu_tanh
from megatron_copd.models.transformer_configs import common_kwargs, drop_fp8, lm_transformer_config
from megatron_copd.models.vlm import CopdModel


class DeepStackLayer(TransformerLayer):
    """A decoder layer that adds ``context[k]`` to its output when it is global layer k."""

    def forward(self, *args, **kwargs):
        output, context = super().forward(*args, **kwargs)
        k = self.layer_number - 1
        if context is not None and k < context.shape[0]:
            output = output + context[k]
        return output, context


class QwenVLModel(CopdModel):
    """Language model + Qwen3-VL vision tower; ``forward`` mirrors CopdModel's, with ``pixels`` a
    :class:`QwenVisualInputs` and ``position_ids`` ``[3, b, s]`` (``[b, s]`` for text only)."""

    def __init__(self, config: TransformerConfig, language_model: LanguageModel,
                 vision_model: QwenVisionModel | None, spec: QwenVisionSpec,
                 pg_collection: ProcessGroupCollection) -> None:
        super().__init__(config, language_model, vision_model, None, spec.image_token_id,
                         pg_collection)
        self.spec = spec

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
              pixels: QwenVisualInputs | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings ``[s, b, h]`` with media features in place, and the DeepStack context."""
        lm = self.language_model
        emb = lm.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        context = None
        if pixels is not None and pixels.numel() > 0:
            if not self.has_vision:
                raise ValueError("images were given to a model built without a vision encoder")
            emb_bsh = emb.transpose(0, 1).clone()
            n_ds = len(self.spec.deepstack_visual_indexes)
            ctx = emb_bsh.new_zeros(n_ds, *emb_bsh.shape) if n_ds else None
            for values, grid, token in (
                (pixels.pixel_values, pixels.image_grid_thw, self.spec.image_token_id),
                (pixels.pixel_values_videos, pixels.video_grid_thw, self.spec.video_token_id),
            ):
                if values is None:
                    continue
                feats, deepstack = self.vision_model(values, grid)
                where = input_ids == token  # [b, s]; batch-major order = the processor's order
                if int(where.sum()) != feats.shape[0]:
                    kind = "image" if token == self.spec.image_token_id else "video"
                    raise ValueError(f"{kind} placeholders ({int(where.sum())} tokens) do not "
                                     f"match the {kind} features given ({feats.shape[0]} tokens)")
                emb_bsh[where] = feats.to(emb.dtype)
                for k, f in enumerate(deepstack):
                    ctx[k][where] = f.to(emb.dtype)
            emb = emb_bsh.transpose(0, 1).contiguous()
            if ctx is not None:
                context = ctx.transpose(1, 2).contiguous()  # [n, s, b, h]
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(
                emb, group=self.pg_collection.tp)
            if context is not None:
                context = torch.stack([tensor_parallel.scatter_to_sequence_parallel_region(
                    c, group=self.pg_collection.tp) for c in context])
        return emb, context

    def forward(self, input_ids, position_ids, attention_mask, labels=None, pixels=None,
                inference_context=None, runtime_gather_output=None, **kwargs):
        decoder_input = context = None
        if self.pre_process:
            decoder_input, context = self.embed(input_ids, position_ids, pixels)
        if context is not None:
            kwargs["extra_block_kwargs"] = {**kwargs.get("extra_block_kwargs", {}),
                                            "context": context}
        return self.language_model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
            decoder_input=decoder_input, labels=labels, inference_context=inference_context,
            runtime_gather_output=runtime_gather_output, **kwargs)


def _tower_config(cfg: RunConfig, spec: QwenVisionSpec, te: bool, **shape) -> TransformerConfig:
    """What the vision tower and its mergers share: one stage (the first), LayerNorm (Qwen3-VL)
    or RMSNorm (Qwen2.5-VL), biases, BF16 even under FP8 (small GEMMs), no sequence parallelism
    and no recompute (the tower runs layer by layer over its attention segments)."""
    kw = common_kwargs(cfg.parallel, cfg.precision, te)
    kw.update(
        pipeline_model_parallel_size=1,
        normalization="LayerNorm" if spec.qwen3 else "RMSNorm",
        layernorm_epsilon=spec.layer_norm_epsilon, gated_linear_unit=False,
        bias_activation_fusion=False,  # megatron fuses only exact GELU / SwiGLU with a bias
        add_bias_linear=True, init_method_std=cfg.model.init_std, sequence_parallel=False,
        recompute_granularity=None, recompute_method=None, recompute_num_layers=None)
    kw.update(shape)
    drop_fp8(kw)
    return TransformerConfig(**kw)


def vision_config(cfg: RunConfig, spec: QwenVisionSpec, te: bool) -> TransformerConfig:
    """The tower's layers: tanh-GELU MLP (Qwen3-VL) or SwiGLU (Qwen2.5-VL), QKV with bias."""
    mlp = (dict(activation_func=gelu_tanh) if spec.qwen3
           else dict(activation_func=F.silu, gated_linear_unit=True))
    return _tower_config(
        cfg, spec, te, num_layers=spec.depth, hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_heads, num_query_groups=spec.num_heads,
        ffn_hidden_size=spec.intermediate_size, kv_channels=spec.head_dim, add_qkv_bias=True,
        **mlp)


def merger_config(cfg: RunConfig, spec: QwenVisionSpec, te: bool) -> TransformerConfig:
    return _tower_config(
        cfg, spec, te, num_layers=1, hidden_size=spec.out_hidden_size,
        num_attention_heads=cfg.parallel.tp,  # unused by the MLP; must divide by TP
        ffn_hidden_size=spec.merge_unit * spec.hidden_size, activation_func=F.gelu)


def build_qwen_vl(cfg: RunConfig, pgs: ProcessGroupCollection,
                  pp_rank: int | None = None) -> QwenVLModel:
    """This rank's pipeline stage of the ``model.qwen_vl`` model (random init; load weights
    after)."""
    validate_qwen_vl(cfg.model, cfg.parallel)  # e.g. DeepStack layers on the first stage
    spec = spec_from_model(cfg.model)
    te = specs.use_transformer_engine(cfg.precision)
    pp_rank = pgs.pp.rank() if pp_rank is None else pp_rank
    pre, post = pp_rank == 0, pp_rank == pgs.pp.size() - 1
    m = cfg.model
    lm_config = lm_transformer_config(cfg, te)
    lm_config.mrope_section = list(spec.mrope_section)
    layer_spec = specs.lm_layer_spec(m.use_qk_norm, te)
    layer_spec.module = DeepStackLayer
    language_model = LanguageModel(
        config=lm_config, transformer_layer_spec=layer_spec, vocab_size=m.vocab_size,
        max_sequence_length=m.max_sequence_length, pre_process=pre, post_process=post,
        parallel_output=True, share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="mrope", rotary_base=int(m.rotary_base),
        scatter_embedding_sequence_parallel=False, pg_collection=pgs)
    language_model.rotary_pos_emb = MultimodalRoPE(m.head_dim, m.rotary_base,
                                                   spec.mrope_section, spec.mrope_interleaved)
    vision = None
    if pre:
        vision = QwenVisionModel(spec, vision_config(cfg, spec, te),
                                 specs.vit_layer_spec(te, rms_norm=not spec.qwen3),
                                 merger_config(cfg, spec, te), specs.projector_submodules(te),
                                 specs.norm_impl(te), pgs)
    model = QwenVLModel(lm_config, language_model, vision, spec, pgs)
    model.fp8_inference = cfg.precision.fp8 is not None and cfg.precision.fp8_rollout
    for module in model.modules():
        if isinstance(module, MegatronModule) and getattr(module, "tp_group", None) is None:
            module.tp_group = pgs.tp
    return model
