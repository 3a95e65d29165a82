"""Kill ``copd train`` (SIGKILL of the launcher and its worker ranks) and resume it: the run ends
with checkpoints bit-identical to an uninterrupted run's and the same metrics.jsonl.

The machinery is ``benchmarks/kill_resume.py`` (which also runs more kill points and times the
SIGTERM path). CI runs one kill point, mid phase I, at the top of cycle 1 (after a phase II, so
Adam moments, sampler positions and the schedule are all mid-flight); set
``COPD_KILL_POINTS=phase1,phase2,save,metrics,async,sigterm`` to run the others too.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

import pytest
from test_engine import TINY

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("kill_resume", REPO / "benchmarks" /
                                                  "kill_resume.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while being created
    spec.loader.exec_module(mod)
    return mod


kr = _bench()
POINTS = [p for p in os.environ.get("COPD_KILL_POINTS", "phase1").split(",") if p]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-resume")
    cache = root / "cache"
    return root, cache, kr.run_reference(TINY, root, cache)


def test_comparison_sees_a_one_step_difference(reference):
    """The equality checks below can fail: two consecutive checkpoints differ in weights,
    optimizer moments, scheduler and engine state (not in the RNG states: rollouts draw from
    seeds derived from (seed, step, branch, rank), the global generators are never advanced)."""
    _, _, ref = reference
    text = ref / "checkpoints" / "text"
    diffs = kr.checkpoint_differences(text / kr.iter_name(kr.TOTAL_STEPS - 1),
                                      text / kr.iter_name(kr.TOTAL_STEPS))
    joined = "\n".join(diffs)
    for needle in ("decoder.layers.mlp.linear_fc1.weight", "exp_avg", "engine_state",
                   "common_state"):
        assert needle in joined, needle
    records = kr.training_records(ref)
    assert {(r["branch"], r["step"]) for r in records if "reward_mean" in r} == {
        (b, s) for b in kr.BRANCHES for s in range(kr.TOTAL_STEPS)}
    # Phase-I GRPO has a learning signal in this run (not only phase-II distillation).
    assert any(r["grad_norm"] > 0 for r in records if "reward_mean" in r and r["phase"] == 1)


@pytest.mark.parametrize("point", POINTS)
def test_killed_and_resumed_run_is_bit_identical(reference, point):
    root, cache, ref = reference
    kill = kr.KILL_POINTS[point]
    trial = kr.run_trial(kill, TINY, root, cache, ref)
    assert not trial.problems, trial.problems
    if kill.sig == signal.SIGKILL:
        assert trial.exit_code == -signal.SIGKILL, trial.exit_code
    else:
        assert trial.exit_code == kr.EXIT_REQUEUE and trial.saved_on_exit is not None
    # The kill interrupted the run: it resumed from a checkpoint before the end.
    assert trial.resume_exit_code == 0
    assert trial.resumed_from is not None and 0 < trial.resumed_from < kr.TOTAL_STEPS, trial
    for branch, diffs in trial.checkpoint_diffs.items():
        assert diffs == [], f"{branch}: {diffs[:5]}"
    assert trial.metrics_diffs == [], trial.metrics_diffs[:5]
