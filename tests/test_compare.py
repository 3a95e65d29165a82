"""`copd compare`: the compute-matched plan of baselines, the --variants filter, and a smoke run
of two variants through `copd train` subprocesses into one results table."""

import json
import subprocess
import sys

import pytest
import yaml
from test_engine import REPO, TINY

from megatron_copd.config import ConfigError, load_config
from megatron_copd.training.compare import select, summarize, variants


def _cfg(branches, **schedule):
    return load_config(None, [f"branches={json.dumps(branches)}",
                              *(f"schedule.{k}={v}" for k, v in schedule.items())])


def test_two_branch_plan_is_compute_matched():
    cfg = _cfg([{"name": "t", "domains": ["text"]}, {"name": "i", "domains": ["image"]}],
               cycles=2, s_rl=3, s_opd=2)
    plan = {v.name: v for v in variants(cfg)}
    assert list(plan) == ["experts", "mixed_rlvr", "static_opd:i<-t", "static_opd:t<-i", "copd",
                          "copd-no:i<-t", "copd-no:t<-i"]
    assert "schedule.steps=10" in plan["experts"].overrides  # 2 cycles x (3 + 2)
    assert "schedule.steps=20" in plan["mixed_rlvr"].overrides  # the sum over both experts
    mixed = next(o for o in plan["mixed_rlvr"].overrides if o.startswith("branches="))
    assert json.loads(mixed.split("=", 1)[1])[0]["domains"] == ["image", "text"]
    assert plan["static_opd:t<-i"].model == "t" and plan["copd"].model == "merged"
    assert "mopd" not in plan  # needs three or more branches


def test_three_branch_hub_adds_mopd_and_no_ablations():
    cfg = _cfg([{"name": n, "domains": [n]} for n in ("text", "image", "video")],
               topology="hub", hub="text")
    names = [v.name for v in variants(cfg)]
    assert "mopd" in names and not any(n.startswith("copd-no") for n in names)
    mopd = next(v for v in variants(cfg) if v.name == "mopd")
    edges = json.loads(next(o for o in mopd.overrides if o.startswith("schedule.edges="))
                       .split("=", 1)[1])
    assert [e["teacher"] for e in edges] == ["text", "image", "video"]


def test_variants_filter():
    cfg = _cfg([{"name": "t", "domains": ["text"]}, {"name": "i", "domains": ["image"]}])
    plan = variants(cfg)
    assert [v.name for v in select(plan, ["copd", "static_opd"])] == [
        "static_opd:i<-t", "static_opd:t<-i", "copd"]
    assert select(plan, []) == plan
    with pytest.raises(ConfigError, match="--variants: unknown mopd; expected some of"):
        select(plan, ["mopd"])


def test_summary_mean_and_std():
    s = summarize({"copd": [{"text": 0.5, "image": 0.3}, {"text": 0.7, "image": 0.3}]})
    assert s["copd"]["text"]["mean"] == pytest.approx(60.0)
    assert s["copd"]["text"]["std"] == pytest.approx(14.142, abs=1e-3)
    assert s["copd"]["overall"]["mean"] == pytest.approx(45.0)


def test_compare_runs_variants_into_one_table(tmp_path):
    cfg = json.loads(json.dumps(TINY))
    cfg.update(run_dir=str(tmp_path / "run"))
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_copd.cli", "compare", str(path), "--seeds", "1",
         "--variants", "experts,copd", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    overlap = summary.pop("overlap_vs_gain")
    assert sorted((r["student"], r["teacher"]) for r in overlap) == [("image", "text"),
                                                                      ("text", "image")]
    for r in overlap:
        assert 0.0 <= r["overlap_first"] <= 1.0 and 0.0 <= r["overlap_last"] <= 1.0
        assert r["n"] == 1 and -100.0 <= r["gain"] <= 100.0
    assert set(summary) == {"base", "expert:text", "expert:image", "copd",
                            "copd-branch:text (no merge)", "copd-branch:image (no merge)"}
    for col in summary.values():
        assert set(col) == {"text", "image", "overall"} and col["overall"]["n"] == 1
        assert 0.0 <= col["overall"]["mean"] <= 100.0
    table = (out / "results.md").read_text()
    assert table.startswith("| domain | base | expert:")
    assert "| text <- image |" in table and "Overlap vs gain" in table
    assert (out / "experts" / "seed0" / "results.json").is_file()


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "toy").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_toy_recipe_configs_load_and_schedule(path):
    from megatron_copd.training.schedule import Schedule

    cfg = load_config(path)
    schedule = Schedule(cfg)
    assert cfg.run_dir.startswith("runs/toy_")
    expected = {"grpo_text.yaml": 1, "grpo_image.yaml": 1, "mixed_rlvr.yaml": 1,
                "copd_3branch_hub.yaml": 3, "mopd_3branch.yaml": 4}.get(path.name, 2)
    assert len(cfg.branches) == expected
    edges = {"copd_2branch.yaml": 2, "copd_clip.yaml": 2, "copd_qwen2_5vl.yaml": 2,
             "copd_3branch_hub.yaml": 4,
             "mopd_3branch.yaml": 3,
             "ablation_no_text_from_image.yaml": 1, "static_opd_text_from_image.yaml": 1,
             "static_opd_image_from_text.yaml": 1}.get(path.name, 0)
    assert len(schedule.edges) == edges, path.name
