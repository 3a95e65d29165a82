"""The local decoder layers' core attention: without a mask it runs torch's
scaled_dot_product_attention (no [b, heads, s, s] scores kept for the backward) with megatron's
own result (logits and gradients within 1e-5 in fp32, grouped-query heads, TP=1 and TP=2);
with an explicit mask megatron's unfused attention runs unchanged."""

from __future__ import annotations

import torch
from harness import run_world
from model_fixtures import lm_batch, tiny_config
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region


def _logits_and_grads(rank, world, tp: int):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_copd.models import sdpa_attention
    from megatron_copd.models.factory import build_model
    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.megatron_state import init_megatron_state

    cfg = tiny_config(tp=tp, num_attention_heads=4, num_query_groups=2)
    g = build_branch_groups(BranchLayout(("a",), tp=tp))
    init_megatron_state(g, 3)
    model = build_model(cfg, g.pgs, image_token_id=None)
    b = lm_batch(batch=3, seq=20)
    calls = []
    real = sdpa_attention.F.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    sdpa_attention.F.scaled_dot_product_attention = counting
    own = sdpa_attention.SDPADotProductAttention.forward
    out = {}
    try:
        for name, mask in (("sdpa", None), ("megatron", None), ("masked", b["attention_mask"])):
            if name == "megatron":  # the parent's forward: megatron's unfused attention
                sdpa_attention.SDPADotProductAttention.forward = DotProductAttention.forward
            model.zero_grad()
            before = len(calls)
            logits = model(b["tokens"], b["position_ids"], mask)
            logits.float().square().mean().backward()
            full = gather_from_tensor_model_parallel_region(logits.detach(), group=g.pgs.tp)
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                     if p.grad is not None}
            out[name] = {"logits": full, "grads": grads, "sdpa_calls": len(calls) - before}
            sdpa_attention.SDPADotProductAttention.forward = own
    finally:
        sdpa_attention.F.scaled_dot_product_attention = real
        sdpa_attention.SDPADotProductAttention.forward = own
    return out


def test_mask_free_attention_runs_sdpa_with_megatrons_result():
    for tp in (1, 2):
        for r in run_world(_logits_and_grads, tp, args=(tp,)):
            sdpa, ref, masked = r["sdpa"], r["megatron"], r["masked"]
            assert sdpa["sdpa_calls"] == 2  # one per layer (2 layers) in the forward
            assert ref["sdpa_calls"] == 0 and masked["sdpa_calls"] == 0
            assert (sdpa["logits"] - ref["logits"]).abs().max() <= 1e-5
            # the explicit causal mask is the same attention
            assert (masked["logits"] - ref["logits"]).abs().max() <= 1e-5
            for n, grad in ref["grads"].items():
                diff = (sdpa["grads"][n] - grad).abs().max()
                assert diff <= 1e-5 * max(1.0, float(grad.abs().max())), (n, float(diff))
