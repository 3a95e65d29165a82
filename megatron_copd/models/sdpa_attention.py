"""megatron's local core attention through ``torch.nn.functional.scaled_dot_product_attention``
when no mask is given: training and scoring rows start at column 0 (``training/samples.py``,
``rollout/scoring.py``), so causal attention is exact without a mask, and torch's fused CPU /
CUDA kernels keep memory linear in the sequence length (no ``[b, heads, s, s]`` scores stored
for the backward). With an explicit mask (the rollout's prefill and decode steps), a sliding
window or a non-vanilla softmax, megatron's own unfused attention runs, unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention


class SDPADotProductAttention(DotProductAttention):
    """DotProductAttention whose mask-free causal / unmasked case runs torch's SDPA."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        if (attention_mask is not None or attention_bias is not None
                or packed_seq_params is not None or self.softmax_offset is not None
                or mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask)
                or (causal and query.shape[0] != key.shape[0])
                or is_layer_window_attention(self.config.window_size,
                                             self.config.window_attn_skip_freq,
                                             self.layer_number)):
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        # megatron's scale: softmax_scale times the query-key layer-scaling coefficient that
        # its softmax multiplies back in
        scale = self.softmax_scale * (self.layer_number
                                      if self.config.apply_query_key_layer_scaling else 1)
        dropout = self.attention_dropout.p if self.training else 0.0
        # [s, b, heads, d] -> [b, heads, s, d]; grouped K/V heads shared in the kernel (query
        # head i uses K/V group i // (heads / groups), as megatron's repeat_interleave)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal,
                                             scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        # [b, heads, s, d] -> [s, b, heads * d]
        out = out.permute(2, 0, 1, 3).contiguous()
        return out.view(out.shape[0], out.shape[1], self.hidden_size_per_partition)
