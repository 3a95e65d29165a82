"""megatron TransformerConfigs from the run config: the settings every model of the project
shares (precision, parallel sizes, CPU-safe fusions, FP8, recompute) and the language model's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_copd.config import ModelConfig, ParallelConfig, PrecisionConfig, RunConfig
from megatron_copd.models import precision as prec


def resolve_dtype(precision: PrecisionConfig) -> torch.dtype:
    name = precision.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    return prec.TORCH_DTYPES[name]


def common_kwargs(
    parallel: ParallelConfig, precision: PrecisionConfig, te: bool, num_layers: int = 1
) -> dict:
    dtype = resolve_dtype(precision)
    on_cpu = not torch.cuda.is_available()
    kw = dict(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # CPU: build weights on the host with the full master weight split per TP rank, so the
        # same seed gives the same weights at every TP size; no CUDA fusions.
        use_cpu_initialization=on_cpu,
        bias_activation_fusion=not on_cpu,
        # Never: megatron's fused causal softmax ignores an explicit mask (ours carry the left
        # padding) and needs an apex/NGC-only extension. The TE path has its own attention.
        masked_softmax_fusion=False,
        persist_layer_norm=not on_cpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=not on_cpu,
    )
    if precision.fp8 is not None:
        if not te:
            raise ValueError("precision.fp8 needs Transformer Engine layers")
        kw.update(prec.fp8_transformer_kwargs(precision, num_layers, parallel.pp))
    if parallel.recompute != "none":
        kw.update(recompute_granularity=parallel.recompute)
        if parallel.recompute == "full":
            kw.update(recompute_method="uniform", recompute_num_layers=1)
    return kw


def lm_transformer_config(cfg: RunConfig, te: bool | None = None) -> TransformerConfig:
    """Map the model/parallel/precision sections onto megatron's TransformerConfig."""
    m: ModelConfig = cfg.model
    te = specs.use_transformer_engine(cfg.precision) if te is None else te
    kw = common_kwargs(cfg.parallel, cfg.precision, te, m.num_layers)
    kw.update(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        qk_layernorm=m.use_qk_norm,
        init_method_std=m.init_std,
    )
    kw.update(m.extra)
    return TransformerConfig(**kw)


def drop_fp8(kw: dict) -> None:
    for key in [k for k in kw if k.startswith(("fp8", "num_layers_at_"))]:
        kw.pop(key)
    kw.pop("first_last_layers_bf16", None)
