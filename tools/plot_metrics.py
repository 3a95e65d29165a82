#!/usr/bin/env python
"""Plot a CoPD run: ``python tools/plot_metrics.py RUN_DIR [--out DIR] [--smooth N]``.

Reads ``RUN_DIR/metrics.jsonl`` (schema: megatron_copd/metrics.py) and, if present,
``RUN_DIR/results.json``; writes PNGs to ``--out`` (default ``RUN_DIR/plots``):

* ``rewards.png``  - mean reward per branch over steps, phase-II (distillation) spans shaded;
* ``training.png`` - loss, gradient norm, throughput and (if logged) accuracy per branch;
* ``edges.png``    - top-10 token overlap, symmetric KL and OPD advantage per distillation edge;
* ``accuracy.png`` + ``accuracy.md`` - the held-out accuracy table: base, each branch, merged
  (rows) per domain (columns), best per column in bold.

results.json: the training run's ``{"base": {DOMAIN: acc}, "branches": {NAME: {DOMAIN: acc}},
"merged": {DOMAIN: acc}}``, or ``{"accuracy": {MODEL: {DOMAIN: acc}}}`` (MODEL = base, a branch
name or merged).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import defaultdict
from pathlib import Path

try:
    from megatron_copd.metrics import METRICS_FILE, read_metrics, record_kind
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron_copd.metrics import METRICS_FILE, read_metrics, record_kind

EDGE_PANELS = (
    ("overlap_top10", "top-10 token overlap"),
    ("sym_kl", "symmetric KL"),
    ("opd_advantage_mean", "mean OPD advantage"),
)
TRAINING_PANELS = (
    ("loss", "loss"),
    ("grad_norm", "gradient norm"),
    ("tokens_per_s", "tokens / s"),
    ("accuracy", "training accuracy"),
)


class PlotError(Exception):
    pass


Series = dict[str, tuple[list[int], list[float]]]


def _series(records: list[dict], kind: str, key: str, metric: str) -> Series:
    out: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for r in records:
        if r.get(metric) is None or not isinstance(r.get("step"), int):
            continue
        if kind == "edge":
            if "student" in r and "teacher" in r and record_kind(r) == "edge":
                name = f"{r['student']} -> {r['teacher']}"
            elif record_kind(r) == "branch" and r.get("teacher"):
                name = f"{r['branch']} -> {r['teacher']}"
            else:
                continue
        else:
            if record_kind(r) != "branch":
                continue
            name = r[key]
        xs, ys = out[name]
        xs.append(r["step"])
        ys.append(float(r[metric]))
    return {k: _sorted(*v) for k, v in out.items()}


def _sorted(xs: list[int], ys: list[float]) -> tuple[list[int], list[float]]:
    pairs = sorted(dict(zip(xs, ys)).items())  # a repeated step keeps its last value
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _smooth(ys: list[float], window: int) -> list[float]:
    if window <= 1:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _segments(xs: list[int], ys: list[float]) -> list[tuple[list[int], list[float]]]:
    """Split where steps are missing (edge metrics exist only in phase II), so lines and
    smoothing never bridge a gap."""
    if len(xs) < 3:
        return [(list(xs), list(ys))]
    diffs = sorted(b - a for a, b in itertools.pairwise(xs))
    stride = diffs[len(diffs) // 2]  # the usual logging interval
    segs, start = [], 0
    for i in range(1, len(xs)):
        if xs[i] - xs[i - 1] > stride:
            segs.append((xs[start:i], ys[start:i]))
            start = i
    segs.append((xs[start:], ys[start:]))
    return segs


def _joined(segs: list[tuple[list, list]], window: int) -> tuple[list[float], list[float]]:
    gx: list[float] = []
    gy: list[float] = []
    for xs, ys in segs:
        if gx:
            gx.append((gx[-1] + xs[0]) / 2)
            gy.append(float("nan"))
        gx += xs
        gy += _smooth(ys, window)
    return gx, gy


def _phase2_spans(records: list[dict]) -> list[tuple[float, float]]:
    """Step ranges where the branches were in phase II (from the first branch's records)."""
    branch = next((r["branch"] for r in records if record_kind(r) == "branch"), None)
    steps = sorted(
        (r["step"], r.get("phase"))
        for r in records
        if record_kind(r) == "branch"
        and r.get("branch") == branch
        and isinstance(r.get("step"), int)
    )
    spans, start, prev = [], None, None
    for step, phase in steps:
        in2 = phase in (2, "II", "opd")
        if in2 and start is None:
            start = step
        if not in2 and start is not None:
            spans.append((start - 0.5, prev + 0.5))
            start = None
        prev = step
    if start is not None:
        spans.append((start - 0.5, prev + 0.5))
    return spans


def _colors(names) -> dict[str, str]:
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {n: cycle[i % len(cycle)] for i, n in enumerate(sorted(names))}


def _draw(ax, series: Series, colors, spans, smooth: int, title: str) -> None:
    for i, (a, b) in enumerate(spans):
        label = "phase II (distillation)" if i == 0 else None
        ax.axvspan(a, b, color="0.5", alpha=0.12, lw=0, label=label)
    for name, (xs, ys) in sorted(series.items()):
        segs = _segments(xs, ys)
        longest = max(len(sx) for sx, _ in segs)
        window = smooth if smooth > 0 else max(1, longest // 25)
        marker = "o" if len(xs) <= 60 else None
        if window > 1:
            ax.plot(*_joined(segs, 1), color=colors[name], alpha=0.25, lw=0.8)
        ax.plot(
            *_joined(segs, window), color=colors[name], lw=1.8, label=name, marker=marker, ms=2.5
        )
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def plot_rewards(records, out: Path, smooth: int) -> Path | None:
    import matplotlib.pyplot as plt

    series = _series(records, "branch", "branch", "reward_mean")
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(10.5, 5))
    _draw(ax, series, _colors(series), _phase2_spans(records), smooth, "mean reward per branch")
    ax.set_ylabel("reward")
    return _save(fig, out / "rewards.png")


def plot_training(records, out: Path, smooth: int) -> Path | None:
    import matplotlib.pyplot as plt

    panels = [(t, _series(records, "branch", "branch", m)) for m, t in TRAINING_PANELS]
    panels = [(t, s) for t, s in panels if s]
    if not panels:
        return None
    names = {n for _, s in panels for n in s}
    colors, spans = _colors(names), _phase2_spans(records)
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels):
        _draw(ax, series, colors, spans, smooth, title)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    return _save(fig, out / "training.png")


def plot_edges(records, out: Path, smooth: int) -> Path | None:
    import matplotlib.pyplot as plt

    panels = [(t, _series(records, "edge", "", m)) for m, t in EDGE_PANELS]
    panels = [(t, s) for t, s in panels if s]
    if not panels:
        return None
    names = {n for _, s in panels for n in s}
    colors, spans = _colors(names), _phase2_spans(records)
    fig, axes = plt.subplots(len(panels), 1, figsize=(10.5, 3.6 * len(panels)), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels):
        _draw(ax, series, colors, spans, smooth, f"{title} per edge (student -> teacher)")
        if title.startswith("top-10"):
            ax.set_ylabel("fraction of shared top-10 tokens")
    return _save(fig, out / "edges.png")


def _numbers(row) -> dict[str, float]:
    if not isinstance(row, dict):
        return {}
    return {
        str(d): float(v)
        for d, v in row.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def load_accuracy(path: Path) -> dict[str, dict[str, float]]:
    """MODEL -> DOMAIN -> accuracy from results.json.

    Accepted shapes: ``{"accuracy": {MODEL: {DOMAIN: v}}}``, a bare ``{MODEL: {DOMAIN: v}}``,
    and the training run's ``{"base": {...}, "branches": {NAME: {...}}, "merged": {...}}``
    (a mapping whose values are themselves per-domain mappings is expanded one level).
    """
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlotError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    table = data.get("accuracy", data) if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise PlotError(f"{path}: expected {{'accuracy': {{MODEL: {{DOMAIN: value}}}}}}")
    out: dict[str, dict[str, float]] = {}
    for model, row in table.items():
        if _numbers(row):
            out[str(model)] = _numbers(row)
        elif isinstance(row, dict):
            for name, inner in row.items():
                if _numbers(inner):
                    out[str(name)] = _numbers(inner)
    if not out:
        raise PlotError(f"{path}: no per-domain accuracy found")
    return out


def _model_order(models) -> list[str]:
    rest = [m for m in models if m not in ("base", "merged")]
    return [m for m in ("base",) if m in models] + rest + [m for m in ("merged",) if m in models]


def accuracy_markdown(table: dict[str, dict[str, float]]) -> str:
    domains = sorted({d for row in table.values() for d in row})
    models = _model_order(table)
    best = {d: max(table[m].get(d, float("-inf")) for m in models) for d in domains}
    lines = ["| model | " + " | ".join(domains) + " | mean |", "|---" * (len(domains) + 2) + "|"]
    for m in models:
        cells = []
        for d in domains:
            v = table[m].get(d)
            cell = "-" if v is None else f"{100 * v:.1f}"
            cells.append(f"**{cell}**" if v is not None and v == best[d] else cell)
        vals = [table[m][d] for d in domains if d in table[m]]
        mean = f"{100 * sum(vals) / len(vals):.1f}" if vals else "-"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines) + "\n"


def plot_accuracy(table: dict[str, dict[str, float]], out: Path) -> Path:
    import matplotlib.pyplot as plt

    domains = sorted({d for row in table.values() for d in row})
    models = _model_order(table)
    best = {d: max(table[m].get(d, float("-inf")) for m in models) for d in domains}
    cells, bold = [], []
    for m in models:
        row, brow = [], []
        for d in domains:
            v = table[m].get(d)
            row.append("-" if v is None else f"{100 * v:.1f}")
            brow.append(v is not None and v == best[d])
        vals = [table[m][d] for d in domains if d in table[m]]
        row.append(f"{100 * sum(vals) / len(vals):.1f}" if vals else "-")
        brow.append(False)
        cells.append(row)
        bold.append(brow)
    table_h = 0.3 * (len(models) + 1)
    fig, (ax_bar, ax_tab) = plt.subplots(
        2,
        1,
        figsize=(max(6.5, 1.6 * (len(domains) + 2)), 4.2 + table_h + 0.3),
        gridspec_kw={"height_ratios": [4.2, table_h]},
    )
    width = 0.8 / len(models)
    # Same colour per branch as in the curve plots; base grey, merged black.
    colors = {
        **_colors([m for m in models if m not in ("base", "merged")]),
        "base": "0.65",
        "merged": "0.15",
    }
    for i, m in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(domains))]
        ys = [100 * table[m].get(d, float("nan")) for d in domains]
        ax_bar.bar(xs, ys, width, label=m, color=colors[m])
    ax_bar.set_xticks(range(len(domains)), domains)
    ax_bar.set_ylabel("accuracy (%)")
    ax_bar.set_title("held-out accuracy per domain")
    ax_bar.legend(fontsize=8, ncol=min(len(models), 5))
    ax_bar.grid(axis="y", alpha=0.3)
    ax_tab.axis("off")
    tab = ax_tab.table(
        cellText=cells,
        rowLabels=models,
        colLabels=domains + ["mean"],
        loc="center",
        cellLoc="center",
    )
    tab.scale(1, 1.3)
    for (r, c), cell in tab.get_celld().items():
        if r >= 1 and 0 <= c < len(domains) and bold[r - 1][c]:
            cell.set_text_props(fontweight="bold")
    return _save(fig, out / "accuracy.png")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_run(run_dir: Path, out: Path, smooth: int = 0) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    metrics = run_dir / METRICS_FILE
    results = run_dir / "results.json"
    if not metrics.exists() and not results.exists():
        raise PlotError(f"{run_dir}: no {METRICS_FILE} or results.json (is this a run directory?)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if metrics.exists():
        try:
            records = read_metrics(metrics)
        except ValueError as e:
            raise PlotError(str(e)) from None
        for fn in (plot_rewards, plot_training, plot_edges):
            path = fn(records, out, smooth)
            if path:
                written.append(path)
    if results.exists():
        table = load_accuracy(results)
        written.append(plot_accuracy(table, out))
        md = out / "accuracy.md"
        md.write_text(accuracy_markdown(table))
        written.append(md)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/plots)")
    ap.add_argument(
        "--smooth", type=int, default=0, help="moving-average window in steps (default: auto)"
    )
    args = ap.parse_args(argv)
    try:
        written = plot_run(args.run_dir, args.out or args.run_dir / "plots", args.smooth)
    except PlotError as e:
        print(f"plot_metrics: error: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
