"""`copd check CONFIG [overrides] --nodes N --gpus-per-node G`: will this job work?

Runs on a login node (no GPU, no process group): loads the config for ``N x G`` ranks and
prints the layout (world = K x TP x PP x CP x DP, where each branch's ranks and nodes are,
whether TP groups stay inside a node, where the cross-branch peer traffic goes), the
distillation edges, the data / tokenizer / base-checkpoint paths, whether the base checkpoint's
model matches the config, the run directory's resume state and a per-GPU memory estimate.

Exit status 0 when nothing stops the job; 2 with one line per problem on stderr otherwise.
Warnings (slow but workable layouts) do not change the exit status.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_copd.config import ConfigError, RunConfig, load_config, to_dict
from megatron_copd.errors import CheckpointError
from megatron_copd.model_size import human, memory_per_gpu, model_size, params_per_gpu

# Fields that change tensor shapes: a base checkpoint that differs in any of them cannot load.
SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "ffn_hidden_size",
    "tie_embeddings",
    "qk_layernorm",
)
VISION_SHAPE_KEYS = (
    "image_size",
    "patch_size",
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "ffn_hidden_size",
    "class_token",
)
QWEN_VL_SHAPE_KEYS = ("version", "depth", "hidden_size", "num_heads", "intermediate_size",
                      "patch_size", "temporal_patch_size", "spatial_merge_size",
                      "num_position_embeddings", "deepstack_visual_indexes")
TOWERS = {"vision": ("a vision tower", VISION_SHAPE_KEYS),
          "qwen_vl": ("a Qwen-VL vision tower", QWEN_VL_SHAPE_KEYS)}


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def section(self, title: str) -> None:
        self.lines.append("")
        self.lines.append(title)

    def row(self, key: str, value: str) -> None:
        self.lines.append(f"  {key:<16}{value}")

    def text(self) -> str:
        out = list(self.lines)
        if self.warnings:
            out += ["", f"Warnings ({len(self.warnings)}):"] + [f"  - {w}" for w in self.warnings]
        out += [
            "",
            "Result: OK" if not self.problems else f"Result: {len(self.problems)} problem(s)",
        ]
        return "\n".join(out)


def check_command(args: argparse.Namespace) -> int:
    # A login-node tool: megatron's import-time notices about missing CUDA/TE/apex are noise here.
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    report = check(
        args.config,
        list(args.overrides),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_memory_gb=getattr(args, "gpu_memory_gb", 80.0),
    )
    print(report.text(), flush=True)
    for p in report.problems:
        print(f"copd check: {p}", file=sys.stderr)
    return 2 if report.problems else 0


def check(
    config: str | None,
    overrides: list[str],
    nodes: int,
    gpus_per_node: int,
    gpu_memory_gb: float = 80.0,
) -> Report:
    r = Report()
    if nodes < 1 or gpus_per_node < 1:
        r.problems.append(f"--nodes ({nodes}) and --gpus-per-node ({gpus_per_node}) must be >= 1")
        return r
    world = nodes * gpus_per_node
    name = config or "the embedded toy config"
    r.lines.append(f"copd check: {name} on {nodes} node(s) x {gpus_per_node} GPUs = {world} ranks")
    try:
        cfg = load_config(config, overrides, world_size=world, check_device=False)
        layout_ok = True
    except ConfigError as e:
        # A world size that does not fit: report it, then check the rest with the config's own
        # layout so one run of `copd check` lists every problem.
        try:
            cfg = load_config(config, overrides, check_device=False)
        except ConfigError:
            r.problems.append(str(e))
            return r
        r.problems.append(_world_problem(cfg, world, gpus_per_node) or str(e))
        layout_ok = False

    if layout_ok:
        _layout(r, cfg, gpus_per_node)
    else:
        r.section("Layout")
        r.row("world size", f"{world} ranks do not fit the config's layout (see the problems)")
    _edges(r, cfg)
    _model(r, cfg, gpu_memory_gb, layout_ok)
    _paths(r, cfg)
    _base_checkpoint(r, cfg)
    _run_dir(r, cfg)
    return r


# ---------------------------------------------------------------------------------------------


def _world_problem(cfg: RunConfig, world: int, gpus_per_node: int) -> str | None:
    p = cfg.parallel
    per_dp = len(cfg.branches) * p.tp * p.pp * p.cp
    if world % per_dp == 0:
        return None  # not a divisibility problem (e.g. parallel.dp fixed): keep the config's line
    lcm = per_dp * gpus_per_node // math.gcd(per_dp, gpus_per_node)
    options = [lcm * i // gpus_per_node for i in range(1, 4)]
    gpus = [n * gpus_per_node for n in options]
    return (
        f"world size {world} is not divisible by branches x TP x PP x CP = {len(cfg.branches)} x "
        f"{p.tp} x {p.pp} x {p.cp} = {per_dp}; with {gpus_per_node} GPUs per node use "
        f"{', '.join(map(str, options))} ... nodes ({', '.join(map(str, gpus))} GPUs), "
        f"or change parallel.tp/pp"
    )


def _ranges(values: list[int]) -> str:
    values = sorted(set(values))
    parts, start = [], values[0]
    for a, b in zip(values, values[1:] + [None]):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(parts)


def _layout(r: Report, cfg: RunConfig, gpn: int) -> None:
    from megatron_copd.runtime.branches import BranchLayout

    p = cfg.parallel
    layout = BranchLayout(cfg.branch_names, tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp)
    n = layout.ranks_per_branch
    r.section("Layout")
    r.row(
        "world size",
        f"{layout.world_size} = {layout.num_branches} branches x TP{p.tp} x PP{p.pp} x CP{p.cp} "
        f"x DP{p.dp} ({n} ranks per branch)",
    )
    for k, bname in enumerate(layout.names):
        ranks = layout.branch_ranks(k)
        nodes = [x // gpn for x in ranks]
        shared = sorted(
            {
                layout.names[layout.branch_of(x)]
                for node in set(nodes)
                for x in range(node * gpn, min((node + 1) * gpn, layout.world_size))
            }
            - {bname}
        )
        where = f"ranks {ranks[0]}-{ranks[-1]}, node(s) {_ranges(nodes)}"
        r.row(f"branch {bname}", where + (f" (shared with {', '.join(shared)})" if shared else ""))

    def groups(dim: str) -> list[list[int]]:
        out: dict[tuple, list[int]] = {}
        for rank in range(layout.world_size):
            c = layout.coords(rank)
            out.setdefault(tuple(v for d, v in c.items() if d != dim), []).append(rank)
        return list(out.values())

    for dim, label in (("tp", "TP groups"), ("cp", "CP groups"), ("pp", "PP stages")):
        size = getattr(p, dim)
        if size == 1:
            continue
        gs = groups(dim)
        inside = sum(len({x // gpn for x in g}) == 1 for g in gs)
        if dim == "pp":
            spans = max(len({x // gpn for x in g}) for g in gs)
            r.row(label, f"{size} stages; a pipeline spans up to {spans} node(s)")
            continue
        r.row(label, f"{inside}/{len(gs)} of size {size} inside one node")
        if inside < len(gs):
            r.warnings.append(
                f"parallel.{dim}={size}: {len(gs) - inside} {label} cross nodes (gpus per node "
                f"{gpn} is not a multiple of {size}); {dim.upper()} traffic then leaves NVLink"
            )
    if p.dp > 1:
        r.row("DP groups", f"{len(groups('dp'))} of size {p.dp}")
    if layout.num_branches > 1:
        intra = sum(
            all(layout.peer(x, b) // gpn == x // gpn for b in range(layout.num_branches))
            for x in range(layout.world_size)
        )
        where = (
            "inside a node"
            if intra == layout.world_size
            else (
                "between nodes"
                if intra == 0
                else f"inside a node for {intra} ranks, between nodes for the rest"
            )
        )
        r.row("peer exchange", f"rank r <-> r + k x {n} (same position in every branch), {where}")


def _edges(r: Report, cfg: RunConfig) -> None:
    from megatron_copd.training.topology import build_edges

    s = cfg.schedule
    r.section("Schedule")
    r.row(
        "recipe",
        f"{s.recipe}, {s.cycles} cycles x ({s.s_rl} GRPO + {s.s_opd} GRPO+OPD steps), "
        f"topology {s.topology}",
    )
    if s.recipe not in ("copd", "static_opd", "mopd") or len(cfg.branches) < 2:
        return
    try:
        edges = build_edges(s, cfg.branch_names)
    except ConfigError as e:
        r.problems.append(str(e))
        return
    r.row("edges", ", ".join(e.tag for e in edges) + "  (student->teacher)")


def _model(r: Report, cfg: RunConfig, gpu_memory_gb: float, layout_ok: bool) -> None:
    size = model_size(cfg.model)
    r.section("Model")
    vision = f", vision {human(size.vision)}" if size.vision else ""
    r.row(
        "parameters",
        f"{human(size.total)} per branch (LM {human(size.language)}{vision}); "
        f"x{len(cfg.branches)} branches",
    )
    if not layout_ok:
        return
    stages = params_per_gpu(cfg)
    r.row("per GPU", " / ".join(human(s) for s in stages) + " parameters per pipeline stage")
    mem = memory_per_gpu(cfg)
    opt = (
        f"distributed optimizer over DP{cfg.parallel.dp}"
        if mem.distributed_optimizer
        else ("optimizer replicated")
    )
    r.row(
        "memory / GPU",
        f"~{mem.gib:.1f} GiB weights+grads+Adam ({mem.dtype}, {mem.bytes_per_param:.1f} B/param, "
        f"{opt}) of {gpu_memory_gb:.0f} GiB; each phase below comes on top",
    )
    if mem.gib > 0.9 * gpu_memory_gb:
        r.problems.append(
            f"memory: weights, gradients and optimizer state alone need ~{mem.gib:.0f} GiB per GPU "
            f"(> 90% of {gpu_memory_gb:.0f} GiB); raise parallel.tp/pp, enable "
            f"parallel.distributed_optimizer or use more GPUs"
        )
    elif mem.gib > 0.6 * gpu_memory_gb:
        r.warnings.append(
            f"memory: ~{mem.gib:.0f} GiB of {gpu_memory_gb:.0f} GiB per GPU before activations and "
            f"KV cache; consider parallel.recompute or smaller grpo.micro_batch_size"
        )
    _phases(r, cfg, gpu_memory_gb)


def _phases(r: Report, cfg: RunConfig, gpu_memory_gb: float) -> None:
    """The phases on top of the resident state (``memory_model``), and the peak. Over the card
    it is a warning for now: with today's explicit [T, T] attention masks every example config
    at its lengths exceeds it (issue 25's mask-free layout is what makes them fit)."""
    from megatron_copd.memory_model import GiB, fits, memory_model

    model = memory_model(cfg)
    for phase in model.phases:
        biggest = max(phase.terms, key=lambda term: term.bytes)
        r.row(f"  {phase.name}", f"+{phase.bytes / GiB:.1f} GiB (largest: {biggest.name}, "
                                  f"{biggest.bytes / GiB:.1f} GiB)")
    r.row("memory peak", f"~{model.peak / GiB:.1f} GiB per GPU in {model.peak_phase.name} of "
                         f"{gpu_memory_gb:.0f} GiB")
    line = fits(cfg, gpu_memory_gb)
    if line is not None:
        r.warnings.append(f"memory model: {line}")


def _path_row(r: Report, key: str, path: str | None, kind: str = "any") -> None:
    if not path:
        return
    p = Path(path).expanduser()
    ok = p.is_dir() if kind == "dir" else p.exists()
    r.lines.append(f"  {'ok' if ok else 'MISSING':<8}{key:<26} {path}")
    if not ok:
        what = "directory" if kind == "dir" else "file"
        r.problems.append(f"{key}: {what} not found: {path}")


def _paths(r: Report, cfg: RunConfig) -> None:
    r.section("Paths")
    if cfg.data.world == "toy":
        r.row("data", "toy world (generated and cached on first use)")
    for i, b in enumerate(cfg.branches):
        for j, path in enumerate(b.train_data):
            _path_row(r, f"branches.{i}.train_data.{j}", path)
        for j, path in enumerate(b.eval_data):
            _path_row(r, f"branches.{i}.eval_data.{j}", path)
    _path_row(r, "data.tokenizer", cfg.data.tokenizer, "dir")
    if cfg.data.world == "files" and not any(p.startswith("branches.") for p in r.problems):
        from megatron_copd.errors import UserError
        from megatron_copd.training.branch_data import file_sources

        try:  # every row of every file, as the run will read them
            sources = file_sources(cfg)
            rows = {b: len(recs) for b, recs in sources.train.items()}
            r.row("data rows", ", ".join(f"{b}: {n}" for b, n in rows.items()))
        except UserError as e:
            r.problems.append(str(e))


def _base_checkpoint(r: Report, cfg: RunConfig) -> None:
    from megatron_copd.checkpoint.model_io import read_meta

    path = cfg.checkpoint.load
    r.section("Base checkpoint")
    if not path:
        r.row("checkpoint.load", "none: every branch starts from the toy base / random init")
        return
    if not Path(path).is_dir():
        r.row("checkpoint.load", f"MISSING {path}")
        r.problems.append(f"checkpoint.load: directory not found: {path}")
        return
    try:
        meta = read_meta(path)
    except CheckpointError as e:
        r.row("checkpoint.load", f"UNREADABLE {path}")
        r.problems.append(f"checkpoint.load: {e}")
        return
    if not any((Path(path) / f).exists() for f in (".metadata", "metadata.json")):
        r.problems.append(f"checkpoint.load: {path}: no torch_dist metadata (incomplete copy?)")
    saved = meta.get("model")
    if not isinstance(saved, dict):
        r.row("checkpoint.load", f"ok      {path} (no model config recorded)")
        r.warnings.append(f"checkpoint.load: {path}/copd_meta.json records no model config")
        return
    mismatches = compare_model(saved, to_dict(cfg.model))
    if mismatches:
        r.row("checkpoint.load", f"INCOMPATIBLE {path}")
        for m in mismatches:
            r.problems.append(f"checkpoint.load: {path}: {m}")
    else:
        r.row("checkpoint.load", f"ok      {path} (model shape matches the config)")


def compare_model(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Differences in shape-defining model fields: 'model.X: checkpoint has A, config has B'."""
    out = []

    def differ(prefix: str, keys: tuple[str, ...], a: dict, b: dict) -> None:
        for k in keys:
            if k in a and k in b and a[k] != b[k] and not (a[k] is None or b[k] is None):
                out.append(f"{prefix}{k}: checkpoint has {a[k]!r}, config has {b[k]!r}")

    differ("model.", SHAPE_KEYS + ("family",), saved, wanted)
    for section, (what, keys) in TOWERS.items():
        sv, wv = saved.get(section), wanted.get(section)
        # A checkpoint written before a section existed has none (and no such tower).
        if (sv is None) != (wv is None) and (section in saved or wv is not None):
            has = f"has {what}" if sv else f"has no {what[2:] if what[0] == 'a' else what}"
            out.append(f"model.{section}: the checkpoint {has}, the config "
                       f"{'does not' if sv else 'does'}")
        elif isinstance(sv, dict) and isinstance(wv, dict):
            differ(f"model.{section}.", keys, sv, wv)
    return out


def _run_dir(r: Report, cfg: RunConfig) -> None:
    run = Path(cfg.run_dir)
    r.section("Run directory")
    if not run.exists():
        parent = next((p for p in run.parents if p.exists()), None)
        r.row("run_dir", f"{cfg.run_dir} (new run)")
        if parent is not None and not _writable(parent):
            r.problems.append(
                f"run_dir: {cfg.run_dir} cannot be created ({parent} is not writable)"
            )
        return
    found = []
    for b in cfg.branch_names:
        latest = run / "checkpoints" / b / "latest"
        if latest.is_file():
            found.append(f"{b} {latest.read_text().strip()}")
    extra = f"; resumes from {', '.join(found)}" if found else "; no checkpoint yet (fresh start)"
    r.row("run_dir", f"{cfg.run_dir} exists{extra}")
    if found and len(found) != len(cfg.branches):
        r.warnings.append(
            "run_dir: only some branches have a `latest` checkpoint; the others start fresh"
        )


def _writable(path: Path) -> bool:
    import os

    return os.access(path, os.W_OK | os.X_OK)
