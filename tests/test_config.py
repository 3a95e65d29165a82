"""Config loading: YAML + overrides, and every refusal is one line naming the key."""

import subprocess
import sys

import pytest

from megatron_copd.config import ConfigError, load_config


def test_default_config_loads_and_derives_dp():
    cfg = load_config()
    assert cfg.branch_names == ("text", "image")
    assert cfg.world_size == 2 and cfg.parallel.dp == 1
    cfg = load_config(overrides=["parallel.tp=2", "branches.1.beta=0.5", "optim.lr=1e-6"],
                      world_size=8)
    assert cfg.parallel.dp == 2 and cfg.branches[1].beta == 0.5 and cfg.optim.lr == 1e-6


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["model.hiden_size=64"], None, "unknown key 'model.hiden_size' (did you mean 'model.hidden_size'?)"),
        (["parallel.tp=3"], None, "parallel.tp: 3 must divide model.num_attention_heads (4)"),
        (["model.num_query_groups=3"], None, "model.num_query_groups: 3 must divide"),
        (["parallel.pp=3"], None, "parallel.pp: 3 must divide model.num_layers (4)"),
        (["grpo.group_size=many"], None, "grpo.group_size: expected an integer, got 'many'"),
        (["schedule.recipe=magic"], None, "schedule.recipe: expected one of"),
        (["parallel.tp=2"], 6, "world_size: 6 is not divisible by branches x TP x PP x CP"),
        (["parallel.dp=3"], 4, "parallel.dp: 3 does not match world size 4"),
        (["branches.7.name=x"], None, "override 'branches.7': index out of range"),
        (["optim.lr"], None, "override 'optim.lr': expected key=value"),
        (["grpo.top_p=1.5"], None, "grpo.top_p: expected in (0, 1]"),
    ],
)
def test_config_errors_are_one_line(overrides, world, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides, world_size=world)
    text = str(e.value)
    assert message in text and "\n" not in text


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {hidden_size: 64\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text("branches:\n  - {name: a}\n  - {name: a}\n")
    with pytest.raises(ConfigError, match="names must be unique"):
        load_config(dup)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_prints_one_line_and_exits_nonzero():
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_copd.cli", "train", "parallel.tp=3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.startswith("copd:")]
    assert lines == ["copd: error: parallel.tp: 3 must divide model.num_attention_heads (4)"]


def test_base_config_is_merged_and_loops_are_refused(tmp_path):
    (tmp_path / "common.yaml").write_text(
        "model: {hidden_size: 64, num_layers: 2}\nbranches: [{name: a}, {name: b}]\n"
        "grpo: {group_size: 4}\n")
    (tmp_path / "run.yaml").write_text(
        "base: common.yaml\nmodel: {num_layers: 4}\n"
        "branches: [{name: x, domains: [text]}, {name: y, domains: [image]}]\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert (cfg.model.hidden_size, cfg.model.num_layers) == (64, 4)  # merged mapping
    assert cfg.branch_names == ("x", "y")  # lists replace
    assert cfg.grpo.group_size == 4
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
