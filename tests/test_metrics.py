"""metrics.jsonl + TensorBoard writer, resume truncation, console progress, and the plot tool."""

import io
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_copd.metrics import (
    MetricsWriter,
    Progress,
    read_metrics,
    tensorboard_scalars,
)

REPO = Path(__file__).resolve().parents[1]


def synthetic_records(branches=("text", "image"), hub=None, cycles=3, s_rl=8, s_opd=5, seed=0):
    """A plausible CoPD run: rewards climb, overlap drifts down in phase I and recovers in II."""
    rng = random.Random(seed)
    recs, step = [], 0
    overlap = {b: 0.95 for b in branches}
    for cycle in range(cycles):
        for phase, n in ((1, s_rl), (2, s_opd)):
            for _ in range(n):
                step += 1
                for k, b in enumerate(branches):
                    teachers = [t for t in branches if t != b]
                    if hub:
                        teachers = [hub] if b != hub else teachers
                    overlap[b] += (-0.012 if phase == 1 else 0.02) + rng.gauss(0, 0.004)
                    overlap[b] = min(0.97, max(0.6, overlap[b]))
                    rec = {
                        "branch": b,
                        "cycle": cycle,
                        "phase": phase,
                        "step": step,
                        "reward_mean": 0.2
                        + 0.1 * k
                        + 0.5 * (1 - math.exp(-step / 25))
                        + rng.gauss(0, 0.03),
                        "loss": 0.5 * math.exp(-step / 30) + rng.gauss(0, 0.02),
                        "grad_norm": 1.0 + rng.random() * 0.3,
                        "tokens_per_s": 5000 + rng.gauss(0, 150),
                    }
                    if phase == 2 and len(teachers) == 1:
                        rec.update(
                            teacher=teachers[0],
                            overlap_top10=overlap[b],
                            sym_kl=2.0 * (1 - overlap[b]) + rng.gauss(0, 0.01),
                            opd_advantage_mean=-0.3 * (1 - overlap[b]),
                        )
                    recs.append(rec)
                    if phase == 2 and len(teachers) > 1:
                        for t in teachers:
                            recs.append(
                                {
                                    "student": b,
                                    "teacher": t,
                                    "cycle": cycle,
                                    "phase": 2,
                                    "step": step,
                                    "overlap_top10": overlap[b] - 0.03 * teachers.index(t),
                                    "sym_kl": 2.0 * (1 - overlap[b]) + 0.02 * teachers.index(t),
                                    "opd_advantage_mean": -0.25 * (1 - overlap[b])
                                    - 0.005 * teachers.index(t),
                                }
                            )
    return recs


def _tb_scalars(tb_dir: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_writer_jsonl_and_tensorboard_tags(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.log(
            {
                "branch": "text",
                "cycle": 0,
                "phase": 2,
                "step": 1,
                "reward_mean": 0.5,
                "loss": float("nan"),
                "teacher": "image",
                "overlap_top10": 0.9,
                "sym_kl": 0.2,
            }
        )
        w.log(
            {
                "student": "image",
                "teacher": "text",
                "cycle": 0,
                "phase": 2,
                "step": 1,
                "overlap_top10": 0.8,
            }
        )
        w.log({"kind": "eval", "model": "merged", "domain": "text", "accuracy": 0.7, "step": 1})
        with pytest.raises(TypeError, match="'step' must be an integer"):
            w.log({"branch": "text", "reward_mean": 1.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])  # strict JSON: NaN became null
    assert first["loss"] is None and "time" in first
    tags = _tb_scalars(tmp_path / "tb")
    assert tags["branch/text/reward_mean"] == [1]
    assert tags["branch/text/phase"] == [1]
    assert tags["edge/text->image/overlap_top10"] == [1]  # a branch record's edge metrics
    assert tags["edge/text->image/sym_kl"] == [1]
    assert tags["edge/image->text/overlap_top10"] == [1]
    assert tags["eval/merged/text/accuracy"] == [1]
    assert "branch/text/overlap_top10" not in tags and "branch/text/loss" not in tags


def test_resume_drops_records_after_the_checkpoint_and_a_torn_line(tmp_path):
    recs = synthetic_records(cycles=1, s_rl=6, s_opd=4)  # steps 1..10, both branches
    with MetricsWriter(tmp_path) as w:
        w.log_many(recs)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"branch": "text", "step": 11, "reward_m')  # crash mid-write
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == len(recs)
    with MetricsWriter(tmp_path, resume_steps={"text": 6, "image": 6}) as w:
        kept = read_metrics(tmp_path / "metrics.jsonl")
        assert max(r["step"] for r in kept) == 6
        assert [(r["branch"], r["step"]) for r in kept] == [
            (r["branch"], r["step"]) for r in recs if r["step"] <= 6
        ]
        w.log_many([r for r in recs if r["step"] == 7])
    after = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in after if r.get("branch") == "text"] == list(range(1, 8))
    assert (tmp_path / "metrics.jsonl").read_text().endswith("\n")
    # TensorBoard forgets the purged steps too: each step appears once.
    steps = _tb_scalars(tmp_path / "tb")["branch/text/reward_mean"]
    assert sorted(steps) == list(range(1, 8))


def test_tensorboard_scalars_of_an_edge_record():
    tags = dict(
        tensorboard_scalars(
            {"student": "a", "teacher": "b", "step": 3, "cycle": 1, "phase": "II", "sym_kl": 0.1}
        )
    )
    assert tags == {"edge/a->b/sym_kl": 0.1, "edge/a->b/phase": 2.0}


def test_progress_lines_and_eta():
    now = [100.0]
    out = io.StringIO()
    p = Progress(total_steps=40, start_step=10, stream=out, clock=lambda: now[0])
    now[0] += 20.0  # 5 steps in 20 s -> 4 s/step, 25 steps left -> 100 s
    p.update(15, cycle=1, phase="II", text={"reward": 0.41234, "loss": 0.1})
    line = out.getvalue().strip()
    assert line.startswith("[copd] step 15/40 (38%) | cycle 1 phase II | text: reward=0.4123")
    assert "4.00 s/step" in line and "elapsed 20s" in line and line.endswith("ETA 1m40s")
    quiet = io.StringIO()
    Progress(10, enabled=False, stream=quiet).update(1)
    assert quiet.getvalue() == ""
    bar = io.StringIO()
    p = Progress(10, stream=bar, use_tqdm=True)
    p.update(3, text={"reward": 0.5})
    p.close()
    assert "3/10" in bar.getvalue()


def _plot_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "plot_metrics", REPO / "tools" / "plot_metrics.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_run(run: Path, records, results=None):
    run.mkdir(parents=True)
    with MetricsWriter(run, tensorboard=False) as w:
        w.log_many(records)
    if results is not None:
        (run / "results.json").write_text(json.dumps(results))


def test_plot_tool_writes_pngs_and_accuracy_table(tmp_path):
    # The shape training/run.py writes: base, branches by name, merged.
    results = {
        "domains": ["image", "text"],
        "base": {"text": 0.30, "image": 0.25},
        "branches": {"text": {"text": 0.52, "image": 0.31}, "image": {"text": 0.35, "image": 0.49}},
        "merged": {"text": 0.50, "image": 0.50},
    }
    run = tmp_path / "pair"
    _write_run(run, synthetic_records(), results)
    hub = tmp_path / "hub"
    _write_run(hub, synthetic_records(("text", "image", "video"), hub="text"))
    for r in (run, hub):
        p = subprocess.run(
            [sys.executable, str(REPO / "tools" / "plot_metrics.py"), str(r)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert p.returncode == 0, p.stderr
    names = {Path(x).name for x in p.stdout.split()}
    assert names == {"rewards.png", "training.png", "edges.png"}  # hub run: no results.json
    for png in ["rewards", "training", "edges", "accuracy"]:
        data = (run / "plots" / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, png
    md = (run / "plots" / "accuracy.md").read_text().splitlines()
    assert md[0] == "| model | image | text | mean |"
    assert md[2] == "| base | 25.0 | 30.0 | 27.5 |"
    assert md[3] == "| text | 31.0 | **52.0** | 41.5 |"
    assert md[5] == "| merged | **50.0** | 50.0 | 50.0 |"
    flat = {"accuracy": {"base": {"a": 0.1}, "merged": {"a": 0.2}}}
    (tmp_path / "flat.json").write_text(json.dumps(flat))
    assert _plot_module().load_accuracy(tmp_path / "flat.json") == flat["accuracy"]


def test_plot_tool_errors_are_one_line(tmp_path):
    p = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_metrics.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 2
    assert p.stderr.strip() == (
        f"plot_metrics: error: {tmp_path}: no metrics.jsonl or results.json (is this a run "
        "directory?)"
    )
