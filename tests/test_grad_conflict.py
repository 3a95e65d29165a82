"""The gradient-conflict meter on a problem whose answer is known: the same samples with
opposite advantages have exactly opposite policy gradients (cosine -1), the same samples twice
cosine +1, and the cosine of two unrelated groups is the same at TP=1 and TP=2 (the full
parameter vector, each parameter counted once across TP ranks)."""

from __future__ import annotations

import pytest
import torch
from harness import run_world
from model_fixtures import tiny_config


def _samples(seed: int, sign: float = 1.0):
    from megatron_copd.training.samples import SampleSet

    g = torch.Generator().manual_seed(seed)
    s = SampleSet()
    for p, r in [(6, 5), (9, 3), (4, 7), (7, 4)]:
        s.prompts.append(torch.randint(10, 256, (p,), generator=g).tolist())
        s.responses.append(torch.randint(10, 256, (r,), generator=g).tolist())
        s.old_logp.append(-torch.rand(r, generator=g) * 3)
        s.advantages.append(sign * torch.randn(r, generator=g).abs())
        s.pixels.append(None)
    return s


def _meter(rank, world, tp: int):
    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.megatron_state import init_megatron_state, seed_everything
    from megatron_copd.training.branch_model import BranchModel
    from megatron_copd.training.grad_conflict import gradient_conflict
    from megatron_copd.training.losses import policy_loss
    from megatron_copd.training.samples import build_micro_batches

    cfg = tiny_config(tp=tp)
    groups = build_branch_groups(BranchLayout(("a",), tp=tp))
    init_megatron_state(groups, 5)
    seed_everything(5, groups.pgs.tp.rank())
    branch = BranchModel(cfg, groups, image_token_id=None, total_steps=10)
    # no clipping: the surrogate is linear in the advantages
    loss = policy_loss(groups.pgs.tp, 1e6, 1e6)
    sets = {"math": _samples(1), "opposite": _samples(1, -1.0), "again": _samples(1),
            "other": _samples(2)}
    batches, widths = {}, {}
    for name, s in sets.items():
        batches[name], widths[name] = build_micro_batches(s, 2, 0)
    out = gradient_conflict(branch, batches, loss, widths)
    assert all(float(p.main_grad.abs().max()) == 0 for p in branch.model.parameters())
    return out


def test_meter_on_known_cosines_at_tp1_and_tp2():
    (tp1,) = run_world(_meter, 1, args=(1,))
    print(tp1)
    assert tp1["grad_cos/math/opposite"] == pytest.approx(-1.0, abs=1e-6)
    assert tp1["grad_cos/math/again"] == pytest.approx(1.0, abs=1e-6)
    assert tp1["grad_norm/math"] == pytest.approx(tp1["grad_norm/opposite"], rel=1e-6)
    assert -0.99 < tp1["grad_cos/math/other"] < 0.99
    tp2 = run_world(_meter, 2, args=(2,))
    assert tp2[0] == tp2[1]  # every rank of the branch reports the same
    for key, value in tp1.items():
        assert tp2[0][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
