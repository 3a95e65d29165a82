"""The per-GPU memory model `copd check` prints: its terms for the paper's configuration
(examples/qwen3vl_4b_2branch.yaml) are the figures issue 25 worked out by hand, recompute
removes what it should, and an over-budget run is reported with the setting to change."""

from __future__ import annotations

import pytest

from megatron_copd.config import load_config
from megatron_copd.launch_check import check
from megatron_copd.memory_model import GiB, fits, memory_model

PAPER = "examples/qwen3vl_4b_2branch.yaml"
# The paper's run as issue 25 worked it out by hand: 64 KV rows, no recompute (the example now
# ships 24 rows and full recompute, which fit).
ISSUE = ["grpo.rollout_batch_size=64", "parallel.recompute=none"]


def _terms(cfg, cuda: bool = True) -> dict[str, dict[str, float]]:
    return {p.name: {t.name.split(",")[0].split(" [")[0].split(" x ")[0]: t.bytes / GiB
                     for t in p.terms}
            for p in memory_model(cfg, cuda).phases}


def test_paper_configuration_figures():
    cfg = load_config(PAPER, ISSUE, check_device=False)
    terms = _terms(cfg)
    # 64 rows x 32,768 tokens x 36 layers x K,V x 4 KV heads per TP rank x 128 x bf16
    assert terms["rollout"]["KV cache"] == pytest.approx(144.0)
    # a fused kernel without a mask (TE on CUDA, torch SDPA on the local layers) keeps no
    # [T, T] scores: one layer's would be 32 + 32 GiB of bf16 at T = 32,768, 16 heads per rank
    for cuda in (True, False):
        assert _terms(cfg, cuda)["scoring"]["one layer's attention"] < 0.01
    # no [T, T] mask in training or scoring: their rows start at column 0
    assert not any("mask" in name for phase in ("training", "scoring") for name in terms[phase])
    # logits of one 32k micro-batch per TP rank: the bf16 output, the loss's fp32 copy (~9.3
    # GiB), the cross entropy's softmax and the gradient (fp32 each): 2 + 4 + 4 + 4 bytes
    assert terms["training"]["logits"] == pytest.approx(32768 * 151936 / 2 * 14 / GiB)
    assert memory_model(cfg).resident / GiB == pytest.approx(18.6, abs=0.1)


def test_recompute_drops_the_stored_activations():
    """The fused attention stores only its softmax statistics; full recompute keeps one layer
    input per layer (plus one layer's working set)."""
    def cfg(*o):
        return load_config(PAPER, ISSUE + list(o), check_device=False)

    base = _terms(cfg())["training"]
    sel = _terms(cfg("parallel.recompute=selective"))["training"]
    full = _terms(cfg("parallel.recompute=full"))["training"]
    assert base["softmax statistics (fused attention)"] < 0.1
    assert sel["activations of 36 layers"] == base["activations of 36 layers"]
    # 36 layer inputs of [32768, 2560] bf16 = 5.6 GiB, plus one layer's working set
    assert 5.6 < full["activations of 36 layers"] < 8
    assert sum(full.values()) < sum(base.values()) / 2


def test_over_budget_names_the_setting():
    cfg = load_config(PAPER, ISSUE, check_device=False)
    # the KV cache of 64 rows x 32k tokens (144 GiB; 2.25 GiB a row per GPU at TP2)
    line = fits(cfg, 80)
    assert line == ("grpo.rollout_batch_size: the rollout phase needs ~167 GiB per GPU (KV "
                    "cache, 64 rows x 32768 tokens: 144 GiB) of 80 GiB; at most 25 rows fit")
    # the local layers (CPU) prefill the 8 prompts of the batch with an explicit mask
    cpu = {t.name: t.bytes / GiB for t in memory_model(cfg, False).phases[1].terms}
    assert cpu["prefill mask and one layer's scores [8, P, P]"] == pytest.approx(
        (8 * 16384**2 + 2 * 8 * 16 * 16384**2 * 2) / GiB)
    long = load_config(PAPER, ISSUE + ["data.max_prompt_tokens=512", "grpo.max_new_tokens=32000",
                               "parallel.recompute=selective"], check_device=False)
    line = fits(long, 80)
    assert line.startswith("grpo.rollout_batch_size: the rollout phase needs"), line
    assert line.endswith("at most 27 rows fit"), line
    assert fits(load_config(None), 80) is None  # the toy default fits anything


def test_copd_check_prints_the_phases_and_warns():
    r = check(PAPER, ISSUE, nodes=2, gpus_per_node=8)
    text = r.text()
    for row in ("training", "rollout", "scoring", "memory peak"):
        assert row in text
    assert any(w.startswith("memory model: grpo.rollout_batch_size") for w in r.warnings)


def test_token_budget_sizes_the_training_micro_batch():
    """A 65,536-token budget holds two 32k rows: twice one row's activations and logits; a
    budget below one row still holds that row."""
    def training(*o):
        return _terms(load_config(PAPER, ISSUE + list(o), check_device=False))["training"]

    one = training("grpo.micro_batch_size=1")
    two = training("grpo.max_tokens_per_micro_batch=65536")
    small = training("grpo.max_tokens_per_micro_batch=4096")
    assert two["activations of 36 layers"] == pytest.approx(2 * one["activations of 36 layers"])
    assert two["logits"] == pytest.approx(2 * one["logits"])
    assert small == one
    line = fits(load_config(PAPER, ISSUE + ["grpo.max_tokens_per_micro_batch=262144",
                                    "grpo.rollout_batch_size=8"], check_device=False), 80)
    assert line.startswith("grpo.max_tokens_per_micro_batch: the training phase needs"), line


def test_the_paper_example_fits_an_80_gb_card():
    """examples/qwen3vl_4b_2branch.yaml as shipped (paper lengths, 24 KV rows, full
    recompute): peak <= 80 GiB per GPU, and copd check prints no memory warning."""
    cfg = load_config(PAPER, check_device=False)
    assert cfg.data.max_prompt_tokens == cfg.grpo.max_new_tokens == 16384
    model = memory_model(cfg)
    assert model.peak / GiB <= 80 and fits(cfg, 80) is None
    r = check(PAPER, [], nodes=2, gpus_per_node=8)
    assert not [w for w in r.warnings if w.startswith("memory model")]
