"""Training micro-batches without a ``[T, T]`` mask: each row's tokens start at column 0 (right
padding only) under the model's causal attention, ``attention_mask`` None. The GRPO loss and
its gradients equal those of the left-padded, explicitly masked layout the project used before,
for a text model at TP=1, TP=2 and PP=2 and a CLIP-style VLM with images; no mask is built."""

from __future__ import annotations

import pytest
import torch
from harness import run_world
from model_fixtures import IMAGE_TOKEN, tiny_config

TOL = 1e-5


def _samples(vision: bool):
    from megatron_copd.training.samples import SampleSet

    g = torch.Generator().manual_seed(3)
    s = SampleSet()
    for i, (p, r) in enumerate([(5, 9), (11, 3), (7, 14), (3, 6), (9, 1), (4, 4)]):
        prompt = torch.randint(IMAGE_TOKEN + 1, 256, (p,), generator=g).tolist()
        pixels = None
        if vision and i % 2 == 0:  # an image's 4 placeholder tokens after the first token
            prompt = prompt[:1] + [IMAGE_TOKEN] * 4 + prompt[1:]
            pixels = torch.randn(1, 3, 16, 16, generator=g)
        s.prompts.append(prompt)
        s.responses.append(torch.randint(IMAGE_TOKEN + 1, 256, (r,), generator=g).tolist())
        s.old_logp.append(-torch.rand(r, generator=g) * 3)
        s.advantages.append(torch.randn(r, generator=g))
        s.pixels.append(pixels)
    return s


def _masked_batches(samples, mb: int, pad_id: int):
    """The previous layout: prompts left-padded to one width, an explicit [b, 1, T, T] mask."""
    from megatron_copd.rollout import inputs, layout

    packed = layout.pack(samples.prompts, samples.responses, pad_id=pad_id)
    n, t = packed.tokens.shape
    old, adv = torch.zeros(n, t), torch.zeros(n, t)
    start = packed.prompt_width - 1
    for i in range(n):
        k = len(samples.responses[i])
        old[i, start:start + k] = samples.old_logp[i]
        adv[i, start:start + k] = samples.advantages[i]
    labels = torch.cat([packed.tokens[:, 1:], packed.tokens[:, -1:]], dim=1)
    out = []
    for b in range(0, n, mb):
        sl = slice(b, b + mb)
        out.append({"tokens": packed.tokens[sl], "labels": labels[sl],
                    "position_ids": layout.position_ids(packed.valid[sl]),
                    "attention_mask": layout.attention_mask(packed.valid[sl]),
                    "loss_mask": packed.loss_mask[sl].float(), "old_logp": old[sl],
                    "advantages": adv[sl],
                    "pixels": inputs.concat_media(samples.pixels[sl])})
    return out, t


def _grads(branch) -> dict[str, torch.Tensor]:
    return {n: p.main_grad.detach().clone() for n, p in branch.model.named_parameters()}


def _branch(tp: int, pp: int, vision: bool):
    """A tiny branch (same weights at every TP/PP size) and the GRPO loss."""
    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.megatron_state import init_megatron_state, seed_everything
    from megatron_copd.training.branch_model import BranchModel
    from megatron_copd.training.losses import policy_loss

    cfg = tiny_config(tp=tp, pp=pp, vision=vision)
    groups = build_branch_groups(BranchLayout(("a",), tp=tp, pp=pp))
    init_megatron_state(groups, 7)
    seed_everything(7, groups.pgs.tp.rank())
    branch = BranchModel(cfg, groups, image_token_id=IMAGE_TOKEN if vision else None,
                         total_steps=10)
    return branch, policy_loss(groups.pgs.tp, 0.2, 0.28)


def _compare(rank, world, tp: int, pp: int, vision: bool):
    from megatron_copd.rollout import layout
    from megatron_copd.training.samples import build_micro_batches

    branch, loss = _branch(tp, pp, vision)
    samples = _samples(vision)
    out = {}
    for name in ("masked", "mask_free"):
        branch.ddp_model.zero_grad_buffer()
        if name == "masked":
            batches, t = _masked_batches(samples, 2, 0)
        else:
            real = layout.attention_mask

            def refuse(*a, **k):
                raise AssertionError("a [b, 1, T, T] mask was built for training")

            layout.attention_mask = refuse
            try:
                batches, t = build_micro_batches(samples, 2, 0)
            finally:
                layout.attention_mask = real
            assert all(b["attention_mask"] is None for b in batches)
        metrics = branch.forward_backward(batches, loss, t)
        out[name] = {"loss": [m["loss"] for m in metrics], "grads": _grads(branch)}
    if not metrics:  # not the last pipeline stage: its gradients still compare
        out["masked"]["loss"] = out["mask_free"]["loss"] = []
    return {k: out[k] for k in out}


@pytest.mark.parametrize("tp,pp,vision", [(1, 1, False), (1, 1, True), (2, 1, False),
                                          (1, 2, False)],
                         ids=["tp1", "tp1-images", "tp2", "pp2"])
def test_mask_free_rows_give_the_masked_layouts_loss_and_gradients(tp, pp, vision):
    for r in run_world(_compare, tp * pp, args=(tp, pp, vision)):
        old, new = r["masked"], r["mask_free"]
        for (a_sum, a_n), (b_sum, b_n) in zip(old["loss"], new["loss"]):
            assert a_n == b_n and abs(a_sum - b_sum) <= TOL * max(1.0, abs(a_sum))
        assert old["grads"].keys() == new["grads"].keys()
        for name, g in old["grads"].items():
            scale = max(float(g.abs().max()), 1e-6)
            diff = float((g - new["grads"][name]).abs().max())
            assert diff <= TOL * scale, (name, diff, scale)


def _budget(rank, world, tp: int, pp: int, vision: bool, budget: int):
    from megatron_copd.training.samples import build_micro_batches

    branch, loss = _branch(tp, pp, vision)
    samples = _samples(vision)
    out = {}
    for name, kw in (("fixed", {}), ("budget", {"max_tokens": budget})):
        branch.ddp_model.zero_grad_buffer()
        batches, t = build_micro_batches(samples, 2, 0, **kw)
        metrics = branch.forward_backward(batches, loss, t)
        total = [sum(m["loss"][0] for m in metrics), sum(m["loss"][1] for m in metrics)]
        out[name] = {"loss": total if metrics else None, "grads": _grads(branch),
                     "shapes": [tuple(b["tokens"].shape) for b in batches],
                     "rows": [int(b["loss_mask"].sum()) for b in batches]}
    assert branch.config.variable_seq_lengths is False  # restored after the call
    return out


@pytest.mark.parametrize("tp,pp,vision", [(1, 1, True), (1, 2, False)], ids=["tp1-images", "pp2"])
def test_token_budget_micro_batches_give_the_same_gradient(tp, pp, vision):
    """Samples sorted by length and grouped by a 48-token budget: micro-batches of different
    row counts and widths (through the pipeline at PP=2), the same loss and gradients as fixed
    micro-batches of 2 rows, every response token scored once."""
    budget = 48
    for r in run_world(_budget, tp * pp, args=(tp, pp, vision, budget)):
        fixed, tok = r["fixed"], r["budget"]
        assert len(set(tok["shapes"])) > 1 and len({s[0] for s in tok["shapes"]}) > 1
        assert all(rows * width <= budget or rows == 1 for rows, width in tok["shapes"])
        assert sum(tok["rows"]) == sum(fixed["rows"])
        if fixed["loss"] is not None:
            assert tok["loss"][1] == fixed["loss"][1]
            assert abs(tok["loss"][0] - fixed["loss"][0]) <= 1e-6 * max(1.0, abs(fixed["loss"][0]))
        for name, g in fixed["grads"].items():
            diff = float((g - tok["grads"][name]).abs().max())
            assert diff <= 1e-6 * max(float(g.abs().max()), 1e-6), (name, diff)
