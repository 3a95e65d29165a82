"""One-token decode steps over the megatron model's own (tensor-parallel) weights.

Why: a decode step of megatron's static inference path spends most of its time outside the
matrix products on a small model, and part of it grows with the sequence: the KV cache keeps
keys *before* RoPE, so every step rotates every cached key of every layer again, and local
attention expands grouped-query keys/values to all heads (``repeat_interleave``, a copy of the
whole cache) each step. Profiled on the toy shape (hidden 128, 4 layers, batch 64, 32 new
tokens) those two plus megatron's per-module bookkeeping were about half of the decode time.

What: the same computation as megatron's ``TransformerLayer`` for the layer specs this project
builds without Transformer Engine (RMSNorm/LayerNorm -> fused QKV column-parallel linear ->
optional QK-norm -> RoPE -> grouped-query attention -> row-parallel projection + residual ->
norm -> (gated) MLP + residual), written directly against the modules' parameters:

* keys are stored rotated, in a cache ``[batch, groups, max_len, head_dim]`` per layer written
  in place; the RoPE table comes from the model's own ``rotary_pos_emb`` module, and positions
  are the cache index exactly as in megatron's static path (RoPE is relative, so left padding
  does not change the scores);
* grouped-query attention without expanding keys: queries ``[b, groups, heads/group, d]``
  against keys ``[b, groups, L, d]`` in one batched product;
* tensor parallelism is the modules' own: column-parallel weights are this rank's shard,
  row-parallel outputs are all-reduced over the branch's TP group, the vocabulary-parallel
  embedding and output layer are called as modules; pipeline stages pass hidden states as in
  :class:`~megatron_copd.rollout.pipeline.PipelineStage`.

The prefill stays megatron's (it also runs the vision tower); :meth:`FastDecoder.load` moves
its KV cache into this layout once per KV batch. :func:`unsupported_reason` names what this
path does not implement (Transformer Engine layers, MoE, multimodal RoPE, sliding windows, ...);
the caller then keeps megatron's decode step. Tests compare both paths token for token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.utils import unwrap_model

from megatron_copd.rollout.pipeline import PipelineStage

_MASKED = -10000.0  # megatron's attention_mask_func fill value


def _language_model(model):
    inner = unwrap_model(model)
    return getattr(inner, "language_model", inner)


def unsupported_reason(model) -> str | None:
    """None when :class:`FastDecoder` computes exactly what megatron's layers compute for this
    model, else the first reason it does not."""
    lm = _language_model(model)
    cfg = lm.config
    if getattr(lm, "position_embedding_type", None) != "rope":
        return f"position embedding {getattr(lm, 'position_embedding_type', None)!r} (needs rope)"
    if type(getattr(lm, "rotary_pos_emb", None)) is not RotaryEmbedding:
        return f"rotary embedding {type(lm.rotary_pos_emb).__name__}"
    for flag in ("rotary_interleaved", "multi_latent_attention", "apply_query_key_layer_scaling",
                 "fp32_residual_connection", "apply_residual_connection_post_layernorm",
                 "flash_decode"):
        if getattr(cfg, flag, False):
            return f"config.{flag}"
    if getattr(cfg, "num_moe_experts", None):
        return "mixture of experts"
    if getattr(cfg, "window_size", None) is not None:
        return "sliding-window attention"
    if getattr(cfg, "activation_func_clamp_value", None) is not None or getattr(
        cfg, "glu_linear_offset", 0.0
    ):
        return "clamped or offset GLU activation"
    if getattr(cfg, "softmax_type", "vanilla") != "vanilla":
        return f"softmax_type {cfg.softmax_type!r}"
    if getattr(cfg, "context_parallel_size", 1) > 1:
        return "context parallelism"
    for layer in lm.decoder.layers:
        att, mlp = layer.self_attention, layer.mlp
        checks = {
            "input_layernorm": not isinstance(layer.input_layernorm, IdentityOp),
            "pre_mlp_layernorm": not isinstance(layer.pre_mlp_layernorm, IdentityOp),
            "linear_qkv": type(att.linear_qkv) is ColumnParallelLinear,
            "linear_proj": type(att.linear_proj) is RowParallelLinear,
            "core_attention": isinstance(att.core_attention, DotProductAttention),
            "mlp": type(mlp) is MLP
            and type(mlp.linear_fc1) is ColumnParallelLinear
            and type(mlp.linear_fc2) is RowParallelLinear,
            "cross_attention": isinstance(layer.cross_attention, IdentityOp),
            "attention_output_gate": not getattr(att.config, "attention_output_gate", False),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            return f"layer {layer.layer_number}: {bad[0]} is not the local-spec module"
    return None


class _Layer:
    """One decoder layer's modules and shapes, read once."""

    def __init__(self, layer) -> None:
        att = layer.self_attention
        self.number = layer.layer_number
        self.norm1 = layer.input_layernorm
        self.norm2 = layer.pre_mlp_layernorm
        self.qkv = att.linear_qkv
        self.q_norm = _norm_or_none(att.q_layernorm)
        self.k_norm = _norm_or_none(att.k_layernorm)
        self.proj = att.linear_proj
        self.fc1 = layer.mlp.linear_fc1
        self.fc2 = layer.mlp.linear_fc2
        self.gated = layer.mlp.config.gated_linear_unit
        self.act = layer.mlp.config.activation_func
        self.heads = att.num_attention_heads_per_partition
        self.groups = att.num_query_groups_per_partition
        self.dim = att.hidden_size_per_attention_head
        self.scale = att.core_attention.softmax_scale


def _norm_or_none(module):
    return None if module is None or isinstance(module, IdentityOp) else module


def _linear(module, x: torch.Tensor) -> torch.Tensor:
    """Column-parallel: this rank's output shard (bias included, as megatron adds it)."""
    out = F.linear(x, module.weight)
    return out if module.bias is None else out + module.bias


class FastDecoder:
    """KV cache + decode step for one KV batch of at most ``max_batch`` rows."""

    def __init__(self, model, stage: PipelineStage, tp_group, max_batch: int, max_len: int):
        self.stage = stage
        self.lm = _language_model(model)
        self.layers = [_Layer(layer) for layer in self.lm.decoder.layers]
        self.tp_group = tp_group if dist.get_world_size(tp_group) > 1 else None
        self.max_len = max_len
        self.length = 0
        self.rows = 0
        ref = next(self.lm.parameters())
        self.device, self.dtype = ref.device, ref.dtype
        self.hidden = self.lm.config.hidden_size
        self.act_dtype = ref.dtype
        first = self.layers[0] if self.layers else None
        shape = (max_batch, first.groups, max_len, first.dim) if first else None
        self.k = [torch.empty(shape, dtype=self.act_dtype, device=self.device) for _ in self.layers]
        self.v = [torch.empty(shape, dtype=self.act_dtype, device=self.device) for _ in self.layers]
        self.cos, self.sin = self._rope_table(max_len)

    def reset(self) -> None:
        self.length = self.rows = 0

    def _rope_table(self, max_len: int):
        """cos/sin ``[max_len, rot_dim]`` from the model's own RotaryEmbedding (its base,
        rotary_percent and scaling), as megatron's apply_rotary_pos_emb computes them."""
        freqs = self.lm.rotary_pos_emb(max_len)  # [L, 1, 1, rot_dim]
        freqs = freqs.view(max_len, -1)
        return torch.cos(freqs).to(self.act_dtype), torch.sin(freqs).to(self.act_dtype)

    def _rotate(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """megatron's non-interleaved RoPE on the last dim (rotary part first, rest passed)."""
        rot = cos.shape[-1]
        x, rest = (t, None) if rot == t.shape[-1] else (t[..., :rot], t[..., rot:])
        x1, x2 = torch.chunk(x, 2, dim=-1)
        out = x * cos + torch.cat((-x2, x1), dim=-1) * sin
        return out if rest is None else torch.cat((out, rest), dim=-1)

    def load(self, ctx, length: int, index: torch.Tensor) -> None:
        """Take megatron's prefilled cache (``ctx``, ``length`` tokens, un-rotated keys
        ``[L, b, groups, d]``); row ``i`` of this cache is prefill row ``index[i]``."""
        n = index.shape[0]
        cos, sin = self.cos[:length, None, None, :], self.sin[:length, None, None, :]
        for i, layer in enumerate(self.layers):
            key, value = ctx.key_value_memory_dict[layer.number]
            k = self._rotate(key[:length, index], cos, sin)  # [L, n, g, d]
            self.k[i][:n, :, :length] = k.permute(1, 2, 0, 3)
            self.v[i][:n, :, :length] = value[:length, index].permute(1, 2, 0, 3)
        self.length, self.rows = length, n

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drop every row not in ``keep`` (indices, ascending); the rest move to the front."""
        n = keep.shape[0]
        for cache in (*self.k, *self.v):
            cache[:n, :, : self.length] = cache[keep, :, : self.length]
        self.rows = n

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group is not None:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def _layer(self, i: int, layer: _Layer, h: torch.Tensor, cos, sin, mask) -> torch.Tensor:
        b, pos = h.shape[0], self.length
        x = layer.norm1(h)
        qkv = _linear(layer.qkv, x).view(b, layer.groups, -1, layer.dim)
        per = layer.heads // layer.groups
        q, k, v = torch.split(qkv, [per, 1, 1], dim=2)  # [b, g, per|1, d]
        if layer.q_norm is not None:
            q = layer.q_norm(q)
        if layer.k_norm is not None:
            k = layer.k_norm(k)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        kc, vc = self.k[i], self.v[i]
        kc[:b, :, pos : pos + 1] = k
        vc[:b, :, pos : pos + 1] = v
        keys, values = kc[:b, :, : pos + 1], vc[:b, :, : pos + 1]
        scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(layer.scale)  # [b, g, per, L]
        if mask is not None:
            scores.masked_fill_(mask, _MASKED)
        probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        ctx = torch.matmul(probs, values).reshape(b, layer.heads * layer.dim)
        out = self._reduce(F.linear(ctx, layer.proj.weight))
        if layer.proj.bias is not None:
            out = out + layer.proj.bias
        h = h + out
        x = layer.norm2(h)
        y = _linear(layer.fc1, x)
        if layer.gated:
            a, g = torch.chunk(y, 2, dim=-1)
            y = layer.act(a) * g
        else:
            y = layer.act(y)
        out = self._reduce(F.linear(y, layer.fc2.weight))
        if layer.fc2.bias is not None:
            out = out + layer.fc2.bias
        return h + out

    def step(self, tokens: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor | None:
        """One token per row (``[b]``, b <= rows) -> full-vocabulary logits ``[b, V]`` on the
        last pipeline stage, None elsewhere. ``key_mask [b, 1, 1, length + 1]`` (True =
        padding) or None. The token's position is the cache index (as in megatron's static
        path). Every stage makes the same calls."""
        b = tokens.shape[0]
        if self.length + 1 > self.max_len:
            raise ValueError(f"decode step beyond the KV cache length {self.max_len}")
        stage, lm = self.stage, self.lm
        if stage.is_first:
            h = lm.embedding(input_ids=tokens.view(b, 1), position_ids=None)[0]  # [b, hidden]
        else:
            h = torch.empty(b, self.hidden, dtype=stage.dtype, device=self.device)
            dist.recv(h, src=stage.prev_rank, group=stage.pp)
        cos, sin = self.cos[self.length], self.sin[self.length]
        for i, layer in enumerate(self.layers):
            h = self._layer(i, layer, h, cos, sin, key_mask)
        self.length += 1
        if not stage.is_last:
            dist.send(h.contiguous(), dst=stage.next_rank, group=stage.pp)
            return None
        h = lm.decoder.final_layernorm(h) if lm.decoder.final_layernorm is not None else h
        tied = lm.share_embeddings_and_output_weights
        weight = lm.shared_embedding_or_output_weight() if tied else None
        logits, _ = lm.output_layer(h.unsqueeze(0), weight=weight, runtime_gather_output=True)
        return logits[0]
