"""The CoPD engine end to end on the toy world (tiny sizes): the run directory contract, automatic
resume, and that every phase-II update of a student used its teacher's log-probs at that moment."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from harness import run_world

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "seed": 3,
    "model": {
        "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "num_query_groups": 2,
        "ffn_hidden_size": 128, "max_sequence_length": 192,
        "vision": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 1,
                   "num_attention_heads": 2, "ffn_hidden_size": 64},
    },
    "branches": [{"name": "text", "domains": ["text"]}, {"name": "image", "domains": ["image"]}],
    "schedule": {"cycles": 1, "s_rl": 1, "s_opd": 2},
    "grpo": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 5, "micro_batch_size": 4,
             "reward_workers": 0},
    "opd": {"prompts_per_step": 2},
    "optim": {"lr": 1e-3},
    "data": {"train_size": 60, "eval_size": 12, "base_warmup_steps": 3, "base_warmup_batch": 8},
    "eval": {"max_items": 12, "batch_size": 12},
    "logging": {"progress": False},
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("copd-cache")


def _config(tmp_path: Path, cache_dir: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["run_dir"] = str(tmp_path / "run")
    cfg["data"]["cache_dir"] = str(cache_dir)
    for key, value in changes.items():
        cfg[key] = value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_copd.cli", "train", str(config), *overrides],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )


def test_train_writes_the_run_directory_and_resumes(tmp_path, cache_dir):
    config = _config(tmp_path, cache_dir)
    proc = _train(config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and any((run / "tb").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    branch = [r for r in records if "branch" in r and "teacher" not in r and r.get("kind") != "eval"]
    edges = [r for r in records if "teacher" in r]
    # one record per branch per step; 3 steps (1 phase-I + 2 phase-II)
    assert sorted((r["branch"], r["step"]) for r in branch) == sorted(
        (b, s) for b in ("text", "image") for s in range(3))
    for r in branch:
        for key in ("cycle", "phase", "step", "reward_mean", "loss", "grad_norm", "tokens_per_s"):
            assert key in r, (key, r)
    assert {r["phase"] for r in branch} == {1, 2}
    assert sorted((r["student"], r["teacher"], r["step"]) for r in edges) == sorted(
        (s, t, k) for s, t in (("text", "image"), ("image", "text")) for k in (1, 2))
    for r in edges:
        assert 0.0 <= r["overlap_top10"] <= 1.0 and r["sym_kl"] >= 0.0
        assert "opd_advantage_mean" in r
    for b in ("text", "image"):
        assert (run / "checkpoints" / b / "latest").read_text().strip() == "iter_0000003"
    assert (run / "merged" / "copd_meta.json").is_file()
    results = json.loads((run / "results.json").read_text())
    for model in ("base", "merged"):
        assert set(results[model]) == {"text", "image"}
    assert set(results["branches"]) == {"text", "image"}
    # per-slice accuracy: each question type and phrasing of a domain; the domain's accuracy is
    # a mix of the task slices, and of the phrasing slices
    assert set(results["slices"]) == {"base", "text", "image", "merged"}
    phrasings = {f"phrasing={i}" for i in range(6)}
    for model, by_domain in results["slices"].items():
        acc = results[model] if model in ("base", "merged") else results["branches"][model]
        for d, tasks in (("image", {"task=colour"}), ("text", {"task=expr", "task=word"})):
            slices = by_domain[d]
            assert set(slices) <= tasks | phrasings and set(slices) & tasks, slices
            for group in (tasks, phrasings):
                values = [v for k, v in slices.items() if k in group]
                assert min(values) - 1e-9 <= acc[d] <= max(values) + 1e-9
    assert "merged" in proc.stdout and "overall" in proc.stdout  # the table

    # Run again: everything is done; it resumes from latest and trains no step twice.
    again = _train(config)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    lines = (run / "metrics.jsonl").read_text().splitlines()
    steps = [(r["branch"], r["step"]) for r in map(json.loads, lines)
             if "branch" in r and "teacher" not in r and r.get("kind") != "eval"]
    assert len(steps) == len(set(steps)) == 6


def test_bad_config_fails_before_launch(tmp_path, cache_dir):
    config = _config(tmp_path, cache_dir)
    proc = _train(config, "schedule.topology=custom",
                  'schedule.edges=[{student: text, teacher: audio}]')
    assert proc.returncode == 2
    assert "schedule.edges.0.teacher: unknown branch 'audio'" in proc.stderr


# --------------------------------------------------------------------------------------------
# Phase II uses the teacher's *current* log-probs.


def _phase2_worker(rank, world, cache, run_dir):
    from megatron_copd.config import load_config
    from megatron_copd.rollout.scoring import ScoreSpec, score_responses
    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.megatron_state import init_megatron_state
    from megatron_copd.training import rl_step as rl_step_module
    from megatron_copd.training.branch_data import BranchData
    from megatron_copd.training.branch_model import BranchModel
    from megatron_copd.training.rl_step import RLStep, StepContext
    from megatron_copd.training.run import Resources
    from megatron_copd.training.schedule import Schedule

    cfg_dict = json.loads(json.dumps(TINY))
    cfg_dict["data"]["cache_dir"] = cache
    cfg_dict["run_dir"] = run_dir
    path = Path(run_dir) / f"cfg{rank}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg_dict))
    cfg = load_config(path, world_size=world)
    res = Resources(cfg)
    groups = build_branch_groups(BranchLayout(cfg.branch_names))
    init_megatron_state(groups, cfg.seed + groups.branch)  # the branches differ from the start
    schedule = Schedule(cfg)
    branch = BranchModel(cfg, groups, res.tokenizer.image_token_id, schedule.total_steps)
    teachers = [e.teacher for e in schedule.edges if e.student == groups.branch_name]
    data = BranchData(res.sources, groups.branch_name, teachers, cfg.seed, groups.branch)
    from megatron_copd.rewards import RewardPool

    captured = {}
    real_score_edges = rl_step_module.score_edges

    def spy(model, groups_, edges, rollouts, **kw):
        out = real_score_edges(model, groups_, edges, rollouts, **kw)
        captured["rollouts"] = rollouts
        captured["scores"] = out
        return out

    rl_step_module.score_edges = spy
    checks = []
    with RewardPool(num_workers=0) as rewards:
        step = RLStep(StepContext(cfg, groups, branch, res.tokenizer, data, rewards, {}))
        for i in range(schedule.total_steps):
            plan = schedule.plan(i)
            # The teacher's weights at this moment, shipped to the student for a local check.
            mine = {k: v.detach().clone() for k, v in branch.model.state_dict().items()
                    if not k.endswith("_extra_state")}
            theirs = [None, None]
            torch.distributed.all_gather_object(theirs, mine)
            step.run(plan)
            if plan.phase != 2:
                continue
            (edge, ro), = captured["rollouts"].items()
            scores = next(iter(captured["scores"].values()))
            # Rebuild the teacher locally (a separate one-rank model) and score the same rollouts.
            teacher_weights = theirs[1 - groups.branch]
            checks.append((edge.student, edge.teacher, ro, scores, teacher_weights))
    # Local rescoring with the teacher's weights of that step.
    from megatron_copd.models.factory import build_model

    solo = build_model(cfg, groups.pgs, image_token_id=res.tokenizer.image_token_id)
    diffs = []
    for student, teacher, ro, scores, weights in checks:
        solo.load_state_dict(weights, strict=False)
        ref = score_responses(solo, groups.pgs, ro.sample_prompts(), ro.responses(),
                              pixels=ro.sample_pixels(), spec=ScoreSpec(topk=0, entropy=False),
                              pad_id=res.tokenizer.pad_id)
        n = int(ro.lengths.max())
        mask = torch.arange(n)[None, :] < ro.lengths[:, None]
        diffs.append(float(((ref.logprobs[:, :n] - scores.logprobs[:, :n]).abs() * mask).max()))
    return {"diffs": diffs, "steps": len(checks)}


def test_phase2_updates_use_the_teachers_current_logprobs(tmp_path, cache_dir):
    out = run_world(_phase2_worker, 2, args=(str(cache_dir), str(tmp_path / "run")))
    for r in out:
        assert r["steps"] == 2  # both phase-II steps of the tiny schedule
        assert max(r["diffs"]) <= 1e-4, r["diffs"]
