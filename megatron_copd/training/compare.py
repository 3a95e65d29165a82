"""`copd compare CONFIG`: CoPD and its baselines over several seeds, one results table.

From one CoPD config (2 or more branches) this derives, compute-matched by construction:

- ``experts``: every branch trains alone with GRPO for the same steps (the paper's expert columns);
- ``mixed_rlvr``: one model on the union of the domains for the SUM of the experts' steps;
- ``static_opd:<student><-<teacher>``: for every edge of the topology, the branches train alone
  for N*S_RL steps, then the student distils from the frozen teacher for N*S_OPD steps;
- ``mopd`` (3+ branches): experts train alone, then one extra student distils from all of them;
- ``copd`` and, for two branches, the ablations ``copd-no:<student><-<teacher>`` (one direction
  removed).

Each run is a `copd train` subprocess (its own run directory, its own processes); the table is
written to ``results.md`` / ``results.json`` in ``--out`` (default: ``<run_dir>/compare``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_copd.config import RunConfig, load_config
from megatron_copd.training.topology import build_edges


@dataclass
class Variant:
    name: str  # column label
    overrides: list[str]
    model: str  # which model of the run is evaluated: "merged", "<branch>", or "branches"
    world: int = 0
    columns: dict = field(default_factory=dict)


def _branches_yaml(branches: list[dict]) -> str:
    return "branches=" + json.dumps(branches)


def variants(cfg: RunConfig) -> list[Variant]:
    s = cfg.schedule
    names = list(cfg.branch_names)
    k = len(names)
    per_branch = s.cycles * (s.s_rl + s.s_opd)
    branches = [{"name": b.name, "domains": b.domains, "train_data": b.train_data,
                 "eval_data": b.eval_data, "beta": b.beta} for b in cfg.branches]
    union = sorted({d for b in cfg.branches for d in b.domains})
    edges = build_edges(s, cfg.branch_names)
    # Variants without distillation (or with their own edges) clear the topology settings they
    # do not use: the config refuses unused settings.
    no_edges = ["schedule.hub=null", "schedule.edges=[]", "schedule.drop_edges=[]"]
    out = [
        Variant("experts", ["schedule.recipe=grpo", f"schedule.steps={per_branch}", *no_edges],
                "branches"),
        Variant("mixed_rlvr", [
            "schedule.recipe=mixed_rlvr", f"schedule.steps={per_branch * k}", *no_edges,
            _branches_yaml([{"name": "mixed", "domains": union,
                             "train_data": [p for b in branches for p in b["train_data"]],
                             "eval_data": [p for b in branches for p in b["eval_data"]]}]),
        ], "mixed"),
    ]
    for e in edges:
        out.append(Variant(f"static_opd:{e.student}<-{e.teacher}", [
            "schedule.recipe=static_opd", "schedule.topology=custom", "schedule.hub=null",
            "schedule.edges=" + json.dumps([{"student": e.student, "teacher": e.teacher}]),
            "schedule.drop_edges=[]",
        ], e.student))
    if k >= 3:
        student = {"name": "student", "domains": union,
                   "train_data": [p for b in branches for p in b["train_data"]],
                   "eval_data": [p for b in branches for p in b["eval_data"]]}
        out.append(Variant("mopd", [
            "schedule.recipe=mopd", "schedule.topology=custom", "schedule.hub=null",
            _branches_yaml([student, *branches]),
            "schedule.edges=" + json.dumps([{"student": "student", "teacher": n} for n in names]),
            "schedule.drop_edges=[]",
        ], "student"))
    out.append(Variant("copd", [], "merged"))
    if k == 2:
        for e in edges:
            out.append(Variant(f"copd-no:{e.student}<-{e.teacher}", [
                "schedule.drop_edges=" + json.dumps([{"student": e.student, "teacher": e.teacher}]),
            ], "merged"))
    return out


def _run(config_path: str | None, overrides: list[str], log_path: Path) -> int:
    cmd = [sys.executable, "-m", "megatron_copd.cli", "train"]
    if config_path:
        cmd.append(config_path)
    cmd += overrides
    with open(log_path, "w") as log:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                              check=False).returncode


def _model_accuracy(results: dict, model: str) -> dict[str, float] | None:
    if model == "merged":
        return results.get("merged")
    return results.get("branches", {}).get(model)


def select(plan: list[Variant], wanted: list[str] | None) -> list[Variant]:
    """The variants named in ``wanted`` (a name, or the part before ``:`` for a family such as
    ``static_opd``), in plan order; all of them when ``wanted`` is empty."""
    if not wanted:
        return plan
    names = {v.name for v in plan} | {v.name.split(":")[0] for v in plan}
    unknown = [w for w in wanted if w not in names]
    if unknown:
        from megatron_copd.config import ConfigError

        raise ConfigError(f"--variants: unknown {', '.join(unknown)}; expected some of "
                          f"{', '.join(sorted(names))}")
    return [v for v in plan if v.name in wanted or v.name.split(":")[0] in wanted]


def compare_command(config_path: str | None, overrides: list[str], seeds: int = 3,
                    out: str | None = None, only: list[str] | None = None) -> int:
    cfg = load_config(config_path, overrides)
    plan = select(variants(cfg), only)
    for v in plan:  # every variant's own config is valid before the first run starts
        load_config(config_path, [*overrides, *v.overrides])
    if cfg.data.world == "files":  # and so are the data files (one line naming file and row)
        from megatron_copd.training.branch_data import file_sources

        file_sources(cfg)
    out_dir = Path(out or Path(cfg.run_dir) / "compare")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [(v, seed) for v in plan for seed in range(seeds)]
    print(f"[compare] {len(plan)} variants x {seeds} seeds = {len(runs)} runs -> {out_dir}",
          flush=True)
    table: dict[str, list[dict]] = {}
    base: list[dict] = []
    edges: dict[tuple[str, str], list[dict]] = {}
    t0 = time.perf_counter()
    for i, (v, seed) in enumerate(runs):
        run_dir = out_dir / v.name.replace(":", "_").replace("<-", "-from-") / f"seed{seed}"
        ov = [*overrides, *v.overrides, f"run_dir={run_dir}", f"seed={cfg.seed + seed}"]
        done = run_dir / "results.json"
        if not done.is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            rc = _run(config_path, ov, run_dir / "train.log")
            if rc != 0:
                print(f"[compare] {v.name} seed {seed} FAILED (exit {rc}); see {run_dir}/train.log",
                      flush=True)
                return rc
        results = json.loads(done.read_text())
        if "base" in results and len(base) <= seed:  # one base entry per seed
            base.append(results["base"])
        if v.model == "branches":
            for b, acc in results.get("branches", {}).items():
                table.setdefault(f"expert:{b}", []).append(acc)
        else:
            acc = _model_accuracy(results, v.model)
            if acc:
                table.setdefault(v.name, []).append(acc)
            if v.name == "copd":
                for b, a in results.get("branches", {}).items():
                    table.setdefault(f"copd-branch:{b} (no merge)", []).append(a)
                for key, e in edge_trajectories(run_dir, results, cfg).items():
                    edges.setdefault(key, []).append(e)
        elapsed = time.perf_counter() - t0
        eta = elapsed / (i + 1) * (len(runs) - i - 1)
        print(f"[compare] {i + 1}/{len(runs)} {v.name} seed {seed} done "
              f"({elapsed:.0f}s, eta {eta:.0f}s)", flush=True)
    summary = summarize({"base": base, **table})
    overlap = summarize_edges(edges)
    text = render_markdown(summary) + render_edges(overlap)
    (out_dir / "results.json").write_text(
        json.dumps({**summary, "overlap_vs_gain": overlap}, indent=2, sort_keys=True))
    (out_dir / "results.md").write_text(text)
    print(text, flush=True)
    return 0


def edge_trajectories(run_dir: Path, results: dict, cfg: RunConfig) -> dict:
    """Per CoPD edge of one run: top-k overlap at its first and last phase-II step, and the
    student's gain over the base on the teacher's domains (what the edge was meant to teach)."""
    from megatron_copd.metrics import read_metrics, record_kind

    domains = {b.name: b.domains for b in cfg.branches}
    out: dict[tuple[str, str], dict] = {}
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if record_kind(r) != "edge" or "overlap_top10" not in r:
            continue
        e = out.setdefault((r["student"], r["teacher"]), {"overlap": []})
        e["overlap"].append((r["step"], r["overlap_top10"]))
    for (student, teacher), e in out.items():
        traj = [o for _, o in sorted(e.pop("overlap"))]
        acc = results.get("branches", {}).get(student, {})
        base = results.get("base", {})
        taught = [d for d in domains.get(teacher, []) if d in acc and d in base]
        e.update(first=traj[0], last=traj[-1],
                 gain=100 * statistics.mean(acc[d] - base[d] for d in taught) if taught else None)
    return out


def summarize_edges(edges: dict[tuple[str, str], list[dict]]) -> list[dict]:
    rows = []
    for (student, teacher), per_seed in sorted(edges.items()):
        gains = [e["gain"] for e in per_seed if e["gain"] is not None]
        rows.append({
            "student": student, "teacher": teacher, "n": len(per_seed),
            "overlap_first": statistics.mean(e["first"] for e in per_seed),
            "overlap_last": statistics.mean(e["last"] for e in per_seed),
            "gain": statistics.mean(gains) if gains else None,
        })
    return rows


def render_edges(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["", "Overlap vs gain (CoPD runs): top-10 token overlap of each edge at its first and",
             "last phase-II step, and the student's accuracy gain over the base on the teacher's",
             "domains (points, mean over seeds).", "",
             "| student <- teacher | overlap first | overlap last | gain |", "|---|---|---|---|"]
    for r in rows:
        gain = "" if r["gain"] is None else f"{r['gain']:+.1f}"
        lines.append(f"| {r['student']} <- {r['teacher']} | {r['overlap_first']:.3f} | "
                     f"{r['overlap_last']:.3f} | {gain} |")
    return "\n".join(lines) + "\n"


def summarize(columns: dict[str, list[dict]]) -> dict:
    """{column: [per-seed {domain: acc}]} -> {column: {domain|overall: {mean, std, n}}}."""
    out = {}
    for col, per_seed in columns.items():
        if not per_seed:
            continue
        domains = sorted(per_seed[0])
        entry = {}
        for d in [*domains, "overall"]:
            vals = [100 * (statistics.mean(r.values()) if d == "overall" else r[d])
                    for r in per_seed]
            entry[d] = {"mean": statistics.mean(vals),
                        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
        out[col] = entry
    return out


def render_markdown(summary: dict) -> str:
    cols = list(summary)
    rows = sorted({d for c in cols for d in summary[c]} - {"overall"}) + ["overall"]
    head = "| domain | " + " | ".join(cols) + " |"
    sep = "|---|" + "---|" * len(cols)
    lines = [head, sep]
    for d in rows:
        cells = []
        for c in cols:
            v = summary[c].get(d)
            cells.append("" if v is None else f"{v['mean']:.1f} ± {v['std']:.1f}")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nAccuracy %, mean ± std over seeds (greedy, held-out sets).\n"
