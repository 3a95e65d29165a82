"""Every numeric run-config field has a declared domain (config_checks.CONSTRAINTS), and a value
outside it is refused before launch with one line naming the field; the three cases issue 18
reported (a negative learning rate, an empty data file, edges naming a missing branch)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_copd.config import ConfigError, RunConfig, load_config
from megatron_copd.config_checks import CONSTRAINTS, Bound, numeric_fields

REPO = Path(__file__).resolve().parents[1]
QWEN_TOY = REPO / "examples" / "toy" / "copd_qwen3vl.yaml"


def test_every_numeric_field_has_a_domain():
    fields = numeric_fields(RunConfig)
    assert len(fields) >= 90
    missing = [f for f in fields if f not in CONSTRAINTS]
    assert not missing, f"add a config_checks.CONSTRAINTS entry for {missing}"
    assert not set(CONSTRAINTS) - set(fields), set(CONSTRAINTS) - set(fields)


def _bad_values(b: Bound) -> list[float]:
    out = [math.nan, math.inf]
    if b.lo is not None:
        out += [b.lo if b.lo_open else b.lo - 1, b.lo - 1000]
    if b.hi is not None:
        out += [b.hi if b.hi_open else b.hi + 1]
    return out


@pytest.mark.parametrize("name", numeric_fields(RunConfig))
def test_out_of_domain_values_are_refused_naming_the_field(name):
    base = QWEN_TOY if name.startswith("model.qwen_vl.") else None
    key = name.replace("[].", ".0.")
    for v in _bad_values(CONSTRAINTS[name]):
        if isinstance(v, float) and v.is_integer():
            v = int(v)  # so that integer fields see an integer
        listed = name.endswith(("deepstack_visual_indexes", "mrope_section"))
        text = f"{key}=[{v}]" if listed else f"{key}={v}"
        try:
            load_config(base, [text], check_device=False)
        except ConfigError as e:
            msg = str(e)
            assert "\n" not in msg
            assert msg.startswith(key) or msg.startswith(key.rsplit(".", 1)[0]), (text, msg)
            continue
        pytest.fail(f"{text} was accepted")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_copd.cli", "train", *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def test_the_reported_cases_fail_before_launch_with_one_line(tmp_path):
    run = tmp_path / "run"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = {
        "optim.lr: expected > 0, got -1.0": ["optim.lr=-1"],
        f"{empty}: no records (empty file)": [
            "data.world=files", f"data.tokenizer={tmp_path}",
            f"branches=[{{name: text, domains: [text], train_data: [{empty}]}}, "
            f"{{name: image, domains: [image], train_data: [{empty}]}}]"],
        "schedule.edges: used only with schedule.topology 'custom'": [
            "schedule.edges=[{student: text, teacher: video}]"],
        "schedule.edges.0.teacher: unknown branch 'video'": [
            "schedule.topology=custom", "schedule.edges=[{student: text, teacher: video}]"],
        "schedule.hub: recipe 'grpo'": [
            "schedule.recipe=grpo", "schedule.hub=text", "schedule.steps=3"],
    }
    for expected, overrides in cases.items():
        p = _cli("megatron_copd/configs/toy_copd.yaml", f"run_dir={run}", *overrides, cwd=REPO)
        lines = [x for x in p.stderr.splitlines() if x.strip()]
        assert p.returncode == 2 and len(lines) == 1 and expected in lines[0], (expected, p.stderr)
        assert not run.exists()
