"""Parameter counts and a per-GPU memory estimate from the config alone (no model is built).

The counts follow the layers ``models.factory`` builds: a GPTModel decoder (GQA attention with
optional QK-norm, SwiGLU MLP, RMSNorm, tied or untied output layer) and, for the VLM, a CLIP-style
ViT plus a 2-layer MLP projector on the first pipeline stage. Norm weights are counted once per
TP rank (they are replicated); everything else is split over TP.

The memory figure covers what is resident for the whole run: weights, gradients and Adam state.
Activations, the rollout KV cache and temporary buffers come on top and depend on batch shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_copd.config import ModelConfig, QwenVLConfig, RunConfig, VisionConfig


@dataclass(frozen=True)
class ModelSize:
    embedding: int  # input embedding
    output: int  # output layer (0 when tied to the embedding)
    per_layer: int  # one decoder layer
    num_layers: int
    final_norm: int
    vision: int  # ViT + projector (0 for a text-only model)

    @property
    def language(self) -> int:
        return self.embedding + self.output + self.per_layer * self.num_layers + self.final_norm

    @property
    def total(self) -> int:
        return self.language + self.vision


def decoder_layer_params(m: ModelConfig) -> int:
    h, hd = m.hidden_size, m.head_dim
    q, kv = m.num_attention_heads * hd, m.num_query_groups * hd
    attention = h * q + 2 * h * kv + q * h + (2 * hd if m.use_qk_norm else 0)
    attention += (q + 2 * kv) if m.qkv_bias else 0  # Qwen2
    mlp = 3 * h * m.ffn_hidden_size  # SwiGLU: gate + up (fused fc1), down (fc2)
    norms = 2 * h
    return attention + mlp + norms


def vit_layer_params(h: int, f: int) -> int:
    """A ViT block: attention with biases, GELU MLP with biases, 2 LayerNorms."""
    return (4 * h * h + 4 * h) + (2 * h * f + f + h) + 4 * h


def vision_params(v: VisionConfig, lm_hidden: int) -> int:
    h, f = v.hidden_size, v.ffn_hidden_size
    layer = vit_layer_params(h, f)
    patches = (v.image_size // v.patch_size) ** 2 + (1 if v.class_token else 0)
    stem = 3 * v.patch_size**2 * h + patches * h + (h if v.class_token else 0) + 2 * h
    projector = h * lm_hidden + lm_hidden + lm_hidden * lm_hidden + lm_hidden
    return v.num_layers * layer + stem + projector


def qwen_vl_params(q: QwenVLConfig, lm_hidden: int) -> int:
    """A Qwen-VL vision tower: patch embedding, blocks, the merger; Qwen3-VL adds learned
    positions, a patch bias and one merger per DeepStack layer. Qwen2.5-VL's blocks have
    RMSNorms and a SwiGLU MLP with biases."""
    h, f = q.hidden_size, q.intermediate_size
    u = q.spatial_merge_size**2 * h
    merger = u * u + u + u * lm_hidden + lm_hidden
    patch = 3 * q.temporal_patch_size * q.patch_size**2 * h
    if q.version != "qwen3_vl":
        layer = (4 * h * h + 4 * h) + (3 * h * f + 2 * f + h) + 2 * h
        return q.depth * layer + patch + merger + h
    layer = vit_layer_params(h, f)
    stem = patch + h + q.num_position_embeddings * h
    return (q.depth * layer + stem + merger + 2 * h
            + len(q.deepstack_visual_indexes) * (merger + 2 * u))


def model_size(m: ModelConfig) -> ModelSize:
    emb = m.vocab_size * m.hidden_size
    return ModelSize(
        embedding=emb,
        output=0 if m.tie_embeddings else emb,
        per_layer=decoder_layer_params(m),
        num_layers=m.num_layers,
        final_norm=m.hidden_size,
        vision=(vision_params(m.vision, m.hidden_size) if m.vision is not None
                else qwen_vl_params(m.qwen_vl, m.hidden_size) if m.qwen_vl is not None else 0),
    )


def params_per_gpu(cfg: RunConfig) -> list[int]:
    """Parameters held by one GPU of each pipeline stage (TP-split)."""
    size = model_size(cfg.model)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    layers = size.per_layer * (size.num_layers // pp)
    stages = []
    for stage in range(pp):
        n = layers
        if stage == 0:
            n += size.embedding + size.vision
        if stage == pp - 1:
            # Tied embeddings: the last stage keeps its own copy of the embedding for the output.
            n += size.final_norm + (size.output or (size.embedding if pp > 1 else 0))
        stages.append(n // tp)
    return stages


@dataclass(frozen=True)
class MemoryEstimate:
    params: int  # on the most loaded GPU
    bytes_per_param: float
    dtype: str
    distributed_optimizer: bool

    @property
    def gib(self) -> float:
        return self.params * self.bytes_per_param / 2**30


def memory_per_gpu(cfg: RunConfig, assume_cuda: bool = True) -> MemoryEstimate:
    """Weights + gradients + Adam state on the most loaded GPU.

    Mixed precision (bf16/fp16) as megatron runs it: 2 bytes weight + 4 bytes fp32 gradient +
    12 bytes fp32 master weight and Adam moments, the 12 split over DP with the distributed
    optimizer. fp32: 4 + 4 + 8 (no separate master copy).
    """
    dtype = cfg.precision.dtype or ("bf16" if assume_cuda else "fp32")
    dist_opt = cfg.parallel.distributed_optimizer
    if dist_opt is None:
        dist_opt = assume_cuda
    dp = cfg.parallel.dp or 1
    if dtype == "fp32":
        fixed, sharded = 8.0, 8.0
    else:
        fixed, sharded = 6.0, 12.0
    per_param = fixed + (sharded / dp if dist_opt else sharded)
    if cfg.grpo.kl_coef > 0:
        per_param += 2.0 if dtype != "fp32" else 4.0  # frozen reference model for the KL term
    return MemoryEstimate(max(params_per_gpu(cfg)), per_param, dtype, dist_opt)


def human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"
