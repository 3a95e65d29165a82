"""The per-GPU memory model `copd check` prints: its terms for the paper's configuration
(examples/qwen3vl_4b_2branch.yaml) are the figures issue 25 worked out by hand, recompute
removes what it should, and an over-budget run is reported with the setting to change."""

from __future__ import annotations

import pytest

from megatron_copd.config import load_config
from megatron_copd.launch_check import check
from megatron_copd.memory_model import GiB, fits, memory_model

PAPER = "examples/qwen3vl_4b_2branch.yaml"


def _terms(cfg) -> dict[str, dict[str, float]]:
    return {p.name: {t.name.split(",")[0].split(" [")[0]: t.bytes / GiB for t in p.terms}
            for p in memory_model(cfg).phases}


def test_paper_configuration_figures():
    cfg = load_config(PAPER, check_device=False)
    terms = _terms(cfg)
    # 64 rows x 32,768 tokens x 36 layers x K,V x 4 KV heads per TP rank x 128 x bf16
    assert terms["rollout"]["KV cache"] == pytest.approx(144.0)
    # one layer's bf16 scores and softmax at T = 32,768 with 16 heads per rank: 32 + 32 GiB
    assert terms["scoring"]["one layer's attention scores"] == pytest.approx(64.0)
    # fp32 logits of one 32k micro-batch per TP rank (~9.3 GiB), and their gradient
    assert terms["training"]["fp32 logits and their gradient"] == pytest.approx(
        2 * 32768 * 151936 / 2 * 4 / GiB)
    assert memory_model(cfg).resident / GiB == pytest.approx(18.6, abs=0.1)


def test_recompute_drops_the_stored_attention_and_activations():
    base = _terms(load_config(PAPER, check_device=False))["training"]
    sel = _terms(load_config(PAPER, ["parallel.recompute=selective"], check_device=False))
    full = _terms(load_config(PAPER, ["parallel.recompute=full"], check_device=False))
    assert base["attention scores"] > 1000 and sel["training"]["attention scores"] == 0
    assert sel["training"]["activations of 36 layers"] == base["activations of 36 layers"]
    # full: each layer's input only, plus one recomputed layer's working set and scores
    assert full["training"]["attention scores"] == 0
    assert sum(full["training"].values()) < sum(base.values()) / 10


def test_over_budget_names_the_setting():
    cfg = load_config(PAPER, check_device=False)
    line = fits(cfg, 80)
    assert line.startswith("grpo.micro_batch_size: the training phase needs ~2397 GiB")
    long = load_config(PAPER, ["data.max_prompt_tokens=512", "grpo.max_new_tokens=32000",
                               "parallel.recompute=selective"], check_device=False)
    line = fits(long, 80)
    assert line.startswith("grpo.rollout_batch_size: the rollout phase needs"), line
    assert line.endswith("at most 27 rows fit"), line
    assert fits(load_config(None), 80) is None  # the toy default fits anything


def test_copd_check_prints_the_phases_and_warns():
    r = check(PAPER, [], nodes=2, gpus_per_node=8)
    text = r.text()
    for row in ("training", "rollout", "scoring", "memory peak"):
        assert row in text
    assert any(w.startswith("memory model: grpo.micro_batch_size") for w in r.warnings)
