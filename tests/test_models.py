"""Model factory parity: TP=2 vs TP=1 logits (text LM and VLM with an image), PP=2 vs PP=1 loss
and gradient norm through megatron's pipeline schedule, checkpoint resharding."""

import torch
from harness import run_world
from model_fixtures import IMAGE_TOKEN, lm_batch, tiny_config
from megatron.core.tensor_parallel import (
    gather_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)

from megatron_copd.checkpoint.model_io import load_model, save_model
from megatron_copd.models.factory import build_model
from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
from megatron_copd.runtime.megatron_state import init_megatron_state
from megatron_copd.training.branch_model import BranchModel


def _groups(cfg, world):
    layout = BranchLayout.from_world(cfg.branch_names, world, tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    g = build_branch_groups(layout)
    init_megatron_state(g, cfg.seed)
    return g


def _full_logits(rank, world, tp, vision):
    cfg = tiny_config(tp=tp, vision=vision)
    g = _groups(cfg, world)
    model = build_model(cfg, g.pgs, image_token_id=IMAGE_TOKEN).eval()
    b = lm_batch(images_at=3 if vision else None)
    with torch.no_grad():
        out = model(b["tokens"], b["position_ids"], b["attention_mask"], pixels=b["pixels"])
    return gather_from_tensor_model_parallel_region(out, group=g.pgs.tp)


def test_tp2_logits_equal_tp1_text_and_vlm():
    for vision in (False, True):
        ref = run_world(_full_logits, 1, args=(1, vision))[0]
        tp2 = run_world(_full_logits, 2, args=(2, vision))
        assert torch.equal(tp2[0], tp2[1])
        diff = (tp2[0] - ref).abs().max().item()
        assert diff <= 1e-5, (vision, diff)


def _lm_loss(output, batch):
    # output: [b, s, v/tp] -> megatron's vocab-parallel CE wants [s, b, v/tp] and mutates it.
    logits = output.transpose(0, 1).contiguous().clone()
    labels = batch["labels"].transpose(0, 1).contiguous()
    loss = vocab_parallel_cross_entropy(logits, labels, tp_group=_lm_loss.tp_group)
    return loss.sum(), torch.tensor(loss.numel()), {"loss": (loss.sum().item(), loss.numel())}


def _train_once(rank, world, pp, ckpt, save):
    cfg = tiny_config(pp=pp, num_layers=4)
    g = _groups(cfg, world)
    branch = BranchModel(cfg, g, image_token_id=IMAGE_TOKEN)
    if save:
        save_model(branch.model, g.pgs, ckpt, {"model": "tiny"})
    else:
        load_model(branch.model, g.pgs, ckpt)
    _lm_loss.tp_group = g.pgs.tp
    mbs = [lm_batch(seed=i) for i in range(4)]
    for b in mbs:
        b.pop("pixels")
    result = branch.train_step(mbs, _lm_loss, seq_length=24)
    return {"loss": result.metrics.get("loss"), "grad_norm": result.grad_norm,
            "last": g.is_last_stage}


def test_pp2_loss_and_grad_norm_equal_pp1(tmp_path):
    ckpt = tmp_path / "base"
    ref = run_world(_train_once, 1, args=(1, str(ckpt), True))[0]
    out = run_world(_train_once, 2, args=(2, str(ckpt), False))
    last = [o for o in out if o["last"]][0]
    assert abs(last["loss"] - ref["loss"]) <= 1e-5, (last, ref)
    # every stage reports the same (branch-wide) gradient norm
    for o in out:
        assert abs(o["grad_norm"] - ref["grad_norm"]) <= 1e-5 * max(1.0, ref["grad_norm"])
