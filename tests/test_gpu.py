"""GPU tests (``pytest -m gpu``): skipped without CUDA; the TE/FP8 ones also need Transformer
Engine and an FP8-capable GPU. They have not run yet on this project's CPU machine; docs/GPU.md
lists what a GPU session should run first.

1. TE layers vs local layers: same checkpoint, BF16 logits on left-padded batches agree, and
   both match each sequence run alone; TE's KV-cached decode matches a full TE forward.
2. FP8 training steps (every recipe this GPU supports): finite, decreasing loss close to BF16's;
   rollout and scoring run with FP8 off (default) and on (``fp8_rollout``).
3. Two branches on ONE GPU (two processes sharing cuda:0, gloo): train steps and a cross-branch
   teacher-scoring exchange; and a short toy CoPD run through the CLI.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import run_world

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]


def _te_available() -> bool:
    from megatron_copd.models.specs import te_available

    return te_available()


needs_te = pytest.mark.skipif(not HAS_CUDA or not _te_available(),
                              reason="needs Transformer Engine")


def _cfg(impl: str = "auto", precision: dict | None = None, branches=("a",), **model):
    from megatron_copd.config import RunConfig, validate
    from megatron_copd.config_base import from_dict

    m = {"vocab_size": 512, "hidden_size": 128, "num_layers": 2, "num_attention_heads": 4,
         "num_query_groups": 2, "ffn_hidden_size": 256, "max_sequence_length": 128,
         "init_std": 0.05, **model}
    cfg = from_dict(RunConfig, {
        "branches": [{"name": n} for n in branches],
        "model": m,
        "precision": {"dtype": "bf16", "transformer_impl": impl, **(precision or {})},
        "optim": {"lr": 1e-3},
    })
    return validate(cfg, world_size=len(branches))


def _prompts_responses(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(6, 512, (int(torch.randint(3, 14, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(6, 512, (int(torch.randint(4, 11, (1,), generator=g)),),
                               generator=g).tolist() for _ in range(n)]
    return prompts, responses


def _response_logprobs(model, batch, mask="explicit"):
    """log p(response tokens) from one full forward of a packed batch -> list of 1-D tensors."""
    b = batch.to("cuda")
    with torch.no_grad():
        out = model(b.tokens, b.position_ids, b.attention_mask if mask == "explicit" else None)
    logp = torch.log_softmax(out.float(), dim=-1).gather(-1, b.labels[..., None])[..., 0]
    resp = b.response_values(logp)
    return [resp[i, : int(n)].cpu() for i, n in enumerate(b.response_lens)]


def _max_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _te_vs_local(rank, world_size, ckpt):
    from megatron_copd.checkpoint.model_io import load_model, save_model
    from megatron_copd.models.factory import build_model
    from megatron_copd.rollout import layout
    from megatron_copd.rollout.generation import generate
    from megatron_copd.rollout.sampling import SamplingParams
    from megatron_copd.rollout.scoring import ScoreSpec, score_responses
    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.megatron_state import init_megatron_state

    groups = build_branch_groups(BranchLayout(("a",)))
    init_megatron_state(groups, 11)
    local = build_model(_cfg("local"), groups.pgs).cuda().eval()
    save_model(local, groups.pgs, ckpt, {"kind": "test"})
    te = build_model(_cfg("transformer_engine"), groups.pgs).cuda().eval()
    assert "TE" in type(te.language_model.decoder.layers[0].self_attention.linear_qkv).__name__
    load_model(te, groups.pgs, ckpt)  # a local-layer checkpoint into TE layers

    prompts, responses = _prompts_responses(0)
    batch = layout.pack(prompts, responses)
    truth = [_response_logprobs(local, layout.pack([p], [r]))[0]
             for p, r in zip(prompts, responses)]  # each sequence alone: no padding at all
    te_lp = _response_logprobs(te, batch)
    local_lp = _response_logprobs(local, batch)
    visible = _response_logprobs(te, batch, mask="none")  # pads visible: what a lost mask does
    err_te, err_local = _max_diff(te_lp, truth), _max_diff(local_lp, truth)
    err_visible = _max_diff(visible, truth)
    err_te_local = _max_diff(te_lp, local_lp)

    # TE's KV-cached decode (megatron switches decode steps to no_mask; ours must still mask the
    # left padding) against a full TE forward of the same responses.
    ro = generate(te, groups.pgs, prompts, SamplingParams(max_new_tokens=8, seed=3))
    sc = score_responses(te, groups.pgs, prompts, ro.responses(), spec=ScoreSpec(topk=0,
                                                                                  entropy=False))
    valid = torch.arange(8, device="cuda")[None] < ro.lengths[:, None]
    err_decode = float((ro.logprobs - sc.logprobs[:, :8]).abs()[valid].max())
    return {"err_te": err_te, "err_local": err_local, "err_visible": err_visible,
            "err_te_local": err_te_local, "err_decode": err_decode}


@needs_te
def test_te_and_local_layers_agree_in_bf16(tmp_path):
    (r,) = run_world(_te_vs_local, 1, (str(tmp_path / "ckpt"),))
    print(json.dumps(r))
    # The test is sensitive: seeing the padding changes log-probs far more than BF16 noise.
    assert r["err_visible"] > 4 * max(r["err_te"], r["err_local"], 1e-3), r
    tol = 0.05  # BF16 log-prob noise on a 2-layer model
    assert r["err_te"] < tol and r["err_local"] < tol and r["err_te_local"] < tol, r
    assert r["err_decode"] < tol, r


def _fp8_steps(rank, world_size, recipe):
    from megatron_copd.models.precision import sequence_multiple
    from megatron_copd.rollout.generation import generate
    from megatron_copd.rollout.sampling import SamplingParams
    from megatron_copd.rollout.scoring import score_responses
    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.megatron_state import init_megatron_state, seed_everything
    from megatron_copd.training.branch_model import BranchModel
    from megatron_copd.training.losses import sft_loss
    from megatron_copd.training.samples import SampleSet, build_micro_batches

    groups = build_branch_groups(BranchLayout(("a",)))
    init_megatron_state(groups, 5)
    from megatron.core import fp8_utils

    assert fp8_utils.parallel_state.get_amax_reduction_group(True) is groups.pgs.tp_dp_cp
    prompts, responses = _prompts_responses(1, n=8)
    samples = SampleSet()
    for p, r in zip(prompts, responses):
        samples.prompts.append(p)
        samples.responses.append(r)
        samples.old_logp.append(torch.zeros(len(r)))
        samples.advantages.append(torch.zeros(len(r)))
        samples.pixels.append(None)
    out = {}
    for name, precision in (("bf16", {}), ("fp8", {"fp8": recipe})):
        # 4 layers: with tensorwise the first and last stay BF16 (the NVIDIA recipe)
        cfg = _cfg("transformer_engine", precision, hidden_size=256, ffn_hidden_size=512,
                   num_layers=4)
        seed_everything(5)
        branch = BranchModel(cfg, groups, image_token_id=None, total_steps=100)
        batches, seq_len = build_micro_batches(samples, 4, 0, pad_to=sequence_multiple(cfg))
        assert seq_len % sequence_multiple(cfg) == 0
        batches = [{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in b.items()}
                   for b in batches]
        losses, norms = [], []
        for _ in range(6):
            res = branch.train_step(batches, sft_loss(groups.pgs.tp), seq_len)
            losses.append(res.metrics["loss"])
            norms.append(res.grad_norm)
        out[name] = {"losses": losses, "grad_norms": norms}
        if name == "fp8":
            model = branch.model
            for fp8_inference in (False, True):
                model.fp8_inference = fp8_inference
                ro = generate(model, groups.pgs, prompts, SamplingParams(max_new_tokens=5,
                                                                          seed=2))
                sc = score_responses(model, groups.pgs, prompts, ro.responses())
                out[f"inference_fp8_{fp8_inference}"] = bool(
                    torch.isfinite(ro.logprobs).all() and torch.isfinite(sc.logprobs).all())
            assert model.config.fp8 is not None  # the rollout switch restored training FP8
        del branch
        torch.cuda.empty_cache()
    return out


@needs_te
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_fp8_training_step(recipe):
    from megatron_copd.models.precision import fp8_support_problem, te_version

    problem = fp8_support_problem(recipe, torch.cuda.get_device_capability(), torch.version.cuda,
                                  te_version())
    if problem:
        pytest.skip(problem)
    (r,) = run_world(_fp8_steps, 1, (recipe,))
    print(json.dumps(r))
    fp8, bf16 = r["fp8"], r["bf16"]
    assert all(math.isfinite(x) for x in fp8["losses"] + fp8["grad_norms"]), r
    assert fp8["losses"][-1] < fp8["losses"][0], r  # it trains
    # Same initial weights: the first FP8 loss is close to the BF16 one.
    assert abs(fp8["losses"][0] - bf16["losses"][0]) < 0.05 * bf16["losses"][0], r
    assert r["inference_fp8_False"] and r["inference_fp8_True"], r


def _two_branches_one_gpu(rank, world_size):
    import torch.distributed as dist

    from megatron_copd.rollout.exchange import Edge, score_edges
    from megatron_copd.rollout.generation import generate
    from megatron_copd.rollout.sampling import SamplingParams
    from megatron_copd.rollout.scoring import ScoreSpec, score_responses
    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.megatron_state import init_megatron_state
    from megatron_copd.training.branch_model import BranchModel
    from megatron_copd.training.losses import sft_loss
    from megatron_copd.training.samples import SampleSet, build_micro_batches

    assert torch.cuda.current_device() == 0 and dist.get_backend() == "gloo"
    cfg = _cfg(branches=("text", "image"))
    groups = build_branch_groups(BranchLayout(cfg.branch_names))
    init_megatron_state(groups, 100 + groups.branch)  # different weights per branch
    branch = BranchModel(cfg, groups, image_token_id=None, total_steps=10)
    assert next(branch.model.parameters()).device.type == "cuda"
    prompts, responses = _prompts_responses(10 + groups.branch)
    samples = SampleSet()
    for p, r in zip(prompts, responses):
        samples.prompts.append(p)
        samples.responses.append(r)
        samples.old_logp.append(torch.zeros(len(r)))
        samples.advantages.append(torch.zeros(len(r)))
        samples.pixels.append(None)
    batches, seq_len = build_micro_batches(samples, 3, 0)
    batches = [{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in b.items()}
               for b in batches]
    first = branch.train_step(batches, sft_loss(groups.pgs.tp), seq_len)
    ro = generate(branch.model, groups.pgs, prompts, SamplingParams(max_new_tokens=6, seed=4))
    edges = [Edge(0, 1), Edge(1, 0)]
    mine = {e: ro for e in edges if e.student == groups.branch}
    spec = ScoreSpec(topk=3, entropy=False)
    # CUDA tensors cross between the two processes through host memory (gloo).
    got = score_edges(branch.model, groups, edges, mine, spec=spec)
    (edge,) = got
    theirs = got[edge].logprobs  # my rollouts, scored by the peer branch's weights
    own = score_responses(branch.model, groups.pgs, prompts, ro.responses(), spec=spec)
    second = branch.train_step(batches, sft_loss(groups.pgs.tp), seq_len)
    valid = torch.arange(ro.tokens.shape[1], device="cuda")[None] < ro.lengths[:, None]
    return {
        "losses": [first.metrics["loss"], second.metrics["loss"]],
        "teacher_finite": bool(torch.isfinite(theirs[valid]).all()),
        "teacher_differs_from_own": float(
            (theirs - own.logprobs[:, : theirs.shape[1]]).abs()[valid].max()),
    }


def test_two_branches_share_one_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0")[:1])
    out = run_world(_two_branches_one_gpu, 2)
    print(json.dumps(out))
    for r in out:
        assert all(math.isfinite(x) for x in r["losses"]) and r["losses"][1] < r["losses"][0]
        assert r["teacher_finite"]
        # the peer has other weights: its scores are not my own model's
        assert r["teacher_differs_from_own"] > 1e-3


def test_toy_copd_run_two_branches_on_one_gpu(tmp_path):
    """The CLI end to end: 2 branches x 1 cycle (1 GRPO step + 1 OPD step) on cuda:0."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore",
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")[:1]}
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
                 "schedule.cycles=1", "schedule.s_rl=1", "schedule.s_opd=1",
                 "data.base_warmup_steps=20", "data.train_size=200", "data.eval_size=20",
                 "eval.max_items=20", "grpo.prompts_per_step=4", "grpo.group_size=4",
                 "opd.prompts_per_step=4", "grpo.reward_workers=0"]
    p = subprocess.run([sys.executable, "-m", "megatron_copd.cli", "train", *overrides],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
                       check=False)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["branch"] for r in rows} == {"text", "image"}
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert (tmp_path / "run" / "results.json").is_file()
