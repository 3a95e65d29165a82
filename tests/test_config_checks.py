"""Every run-config field has a declared domain (config_checks.CONSTRAINTS), and a value outside
it is refused before launch with one line naming the field; the three cases issue 18
reported (a negative learning rate, an empty data file, edges naming a missing branch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_copd.config import ConfigError, RunConfig, load_config
from megatron_copd.config_checks import CONSTRAINTS, TOY_PHRASINGS, config_fields

REPO = Path(__file__).resolve().parents[1]


def test_every_field_has_a_domain():
    fields = config_fields(RunConfig)
    assert len(fields) >= 139
    missing = [f for f in fields if f not in CONSTRAINTS]
    assert not missing, f"add a config_checks.CONSTRAINTS entry for {missing}"
    assert not set(CONSTRAINTS) - set(fields), set(CONSTRAINTS) - set(fields)


def test_the_toy_phrasing_bound_is_the_worlds():
    from megatron_copd.data.toy.world import PHRASINGS

    assert CONSTRAINTS["data.toy.phrasings"].hi == len(PHRASINGS) == TOY_PHRASINGS


# Values a table written too loosely would let through (the fuzz test, tests/test_config_fuzz.py,
# generates values outside each declared domain; these pin a few domains themselves).
SPOT = {
    "optim.lr=0": "optim.lr: expected > 0, got 0",
    "grpo.top_p=0": "grpo.top_p: expected in (0, 1]",
    "grpo.default_verifier=bogus": "grpo.default_verifier: unknown verifier 'bogus'",
    "branches.0.domains=[nope]": "branches.0.domains.0: unknown domain 'nope'",
    "branches.0.name=a/b": "branches.0.name: expected a name",
    "data.toy.image_tasks=[nope]": "data.toy.image_tasks.0: unknown toy image task 'nope'",
    "data.toy.image_tasks=[]": "data.toy.image_tasks: expected at least one",
    "data.toy.text_max_operand=100": "data.toy.text_max_operand: expected in [2, 99]",
    "data.toy.text_min_steps=3": "data.toy.text_min_steps: 3 exceeds data.toy.text_max_steps",
    "model.extra={nope: 1}": "model.extra.nope: not a megatron TransformerConfig field",
    "data.tokenizer=/tmp": "data.tokenizer: used only with data.world 'files'",
    "branches.0.train_data=[a.jsonl]": "branches.0.train_data: used only with data.world 'files'",
    "data.world=files": "data.tokenizer: required when data.world is 'files'",
    "run_dir=''": "run_dir: expected a path",
    "model.qwen_vl={depth: q}": "model.qwen_vl.depth: expected an integer",
}


@pytest.mark.parametrize("override", sorted(SPOT))
def test_spot_values_are_refused_naming_the_field(override):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override], check_device=False)
    assert str(e.value).startswith(SPOT[override]), str(e.value)


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
        "schedule.edges.0.teacher: unknown branch 'video'; expected one of ['text', 'image']": [
            "schedule.edges=[{student: text, teacher: video}]"],
        "schedule.edges: used only with schedule.topology 'custom'": [
            "schedule.edges=[{student: text, teacher: image}]"],
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


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_refused_command_changes_nothing_on_disk(tmp_path):
    """train / eval / compare / check with a bad value, pointed at an existing run directory
    with checkpoints: one line, exit 2, every file as it was (bytes and mtimes), nothing new."""
    run = tmp_path / "run"
    (run / "checkpoints" / "text" / "iter_0000004").mkdir(parents=True)
    (run / "checkpoints" / "text" / "iter_0000004" / "common.pt").write_bytes(b"weights")
    (run / "config.yaml").write_text("seed: 1\n")
    (run / "metrics.jsonl").write_text('{"step": 4}\n')
    before = _snapshot(run)
    bad = ["schedule.edges=[{student: text, teacher: video}]", f"run_dir={run}"]
    for cmd in (["train"], ["eval", "--checkpoint", str(run / "checkpoints")], ["compare"],
                ["check"]):
        p = subprocess.run([sys.executable, "-m", "megatron_copd.cli", *cmd,
                            "megatron_copd/configs/toy_copd.yaml", *bad],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
        lines = [x for x in p.stderr.splitlines() if x.strip()]
        assert p.returncode == 2 and len(lines) == 1, (cmd, p.stdout, p.stderr)
        assert "schedule.edges.0.teacher: unknown branch 'video'" in lines[0], (cmd, lines)
        assert _snapshot(run) == before, cmd


def _files_cfg(tmp_path: Path, text_rows: list[dict], image_rows: list[dict], *extra: str):
    import json

    from megatron_copd.training.branch_data import file_sources

    paths = []
    for name, rows in (("text", text_rows), ("image", image_rows)):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(p)
    cfg = load_config(None, ["data.world=files", f"data.tokenizer={tmp_path}",
                             f"branches=[{{name: text, domains: [text], train_data: [{paths[0]}]}},"
                             f" {{name: image, domains: [image], train_data: [{paths[1]}]}}]",
                             *extra], check_device=False)
    return lambda: file_sources(cfg), paths


def test_data_rows_must_fit_their_branch_and_model(tmp_path):
    from megatron_copd.errors import DataError

    (tmp_path / "a.png").write_bytes(b"png")
    text = [{"id": "t1", "domain": "text", "prompt": "1+1?", "answer": "2"}]
    image = [{"id": "i1", "domain": "image", "prompt": "colour?", "answer": "red",
              "images": ["a.png"]}]
    load, (tp, ip) = _files_cfg(tmp_path, text, image)
    assert sorted(load().train) == ["image", "text"]
    # a row of another branch's domain in a branch's file
    load, (tp, ip) = _files_cfg(tmp_path, text + [dict(image[0], id="i2")], image)
    with pytest.raises(DataError, match=rf"^{tp}:2: field 'domain': 'image' is not one of"):
        load()
    # a branch of two domains whose files have rows of one only
    load, _ = _files_cfg(tmp_path, text, image, "branches.1.domains=[image, text]")
    with pytest.raises(DataError, match=r"^branches.1.train_data: no rows for domain\(s\) "
                                        r"\['text'\] of branch 'image'"):
        load()
    # media on a text-only model
    load, (tp, ip) = _files_cfg(tmp_path, text, image, "model.qwen_vl=null")
    with pytest.raises(DataError, match=rf"^{ip}:1: field 'images': the model has no vision"):
        load()
    # an unknown verifier
    load, (tp, ip) = _files_cfg(tmp_path, [dict(text[0], reward="bogus")], image)
    with pytest.raises(DataError, match=rf"^{tp}:1: field 'reward': unknown verifier 'bogus'"):
        load()
