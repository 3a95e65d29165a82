"""A training run on this rank: set up the world, the branches and their data, run the schedule,
checkpoint, merge the branches and evaluate base / branches / merged model on every domain.

All branches run in one torch.distributed world; this module only orchestrates — the math is in
``algorithms/``, the per-step work in ``rl_step``, the megatron wiring in ``branch_model``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from megatron_copd.checkpoint.model_io import load_model
from megatron_copd.config import RunConfig, to_dict
from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
from megatron_copd.runtime.distributed import init_distributed
from megatron_copd.runtime.megatron_state import init_megatron_state
from megatron_copd.training.branch_data import (
    BranchData,
    check_tokenizer,
    file_sources,
    toy_sources,
)
from megatron_copd.training.branch_model import BranchModel
from megatron_copd.training.evaluation import evaluate_domain
from megatron_copd.training.reporting import Reporter
from megatron_copd.training.rl_step import RLStep, StepContext
from megatron_copd.training.schedule import Schedule


def _log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"[copd] {msg}", flush=True)


def cache_dir(cfg: RunConfig) -> Path:
    base = cfg.data.cache_dir or os.environ.get("COPD_CACHE_DIR") or "~/.cache/megatron-copd"
    return Path(base).expanduser()


class Resources:
    """Tokenizer, data sources and the base checkpoint: shared by every branch."""

    def __init__(self, cfg: RunConfig) -> None:
        from megatron_copd.data.tokenizer import Tokenizer

        self.world = None
        if cfg.data.world == "toy":
            from megatron_copd.data.toy.vocab import build_toy_tokenizer, tokenizer_dir_name
            from megatron_copd.training.toy_base import configured_toy_world

            self.world = configured_toy_world(cfg, cache_dir(cfg))
            qwen_vl = cfg.model.qwen_vl is not None
            self.tokenizer = build_toy_tokenizer(self.world, cfg.model.vocab_size, qwen_vl)
            name = tokenizer_dir_name(cfg.model.vocab_size, qwen_vl)
            self.tokenizer_dir = str(self.world.root / name)
            self.sources = toy_sources(cfg, self.world)
        else:
            self.sources = file_sources(cfg)
            self.tokenizer = Tokenizer.load(cfg.data.tokenizer)
            self.tokenizer_dir = cfg.data.tokenizer
        check_tokenizer(cfg, self.tokenizer, self.tokenizer_dir)

    def base_checkpoint(self, cfg: RunConfig) -> Path | None:
        if cfg.checkpoint.load:
            return Path(cfg.checkpoint.load)
        if self.world is None:
            return None
        from megatron_copd.training.toy_base import ensure_toy_base

        return ensure_toy_base(cfg, self.world, self.tokenizer, self.tokenizer_dir,
                               cache_dir(cfg), log=_log)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def evaluate_all(cfg, groups, branch, res, rewards, domains, cache) -> dict[str, dict]:
    """This branch's model on every domain."""
    return {
        d: evaluate_domain(cfg, groups, branch.model, res.tokenizer, rewards, res.sources.eval[d],
                           cache)
        for d in domains
    }


def _gather_by_branch(value, groups) -> list:
    """Every rank's ``value``; returns the first rank of each branch's entry, by branch."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    n = groups.layout.ranks_per_branch
    return [out[b * n] for b in range(groups.layout.num_branches)]


def run_training(cfg: RunConfig) -> int:
    from megatron_copd.runtime.preemption import PreemptionHandler

    init_distributed()
    # Installed first, so that a SIGTERM/SIGUSR1 during start-up is not fatal: it is acted on at
    # the first step boundary (checkpoint, then exit for requeue).
    with PreemptionHandler(cfg.checkpoint.grace_seconds) as stop:
        return _train(cfg, stop)


def _train(cfg: RunConfig, stop) -> int:
    from megatron_copd.rewards import RewardPool
    from megatron_copd.runtime.exit_codes import EXIT_OK, EXIT_REQUEUE
    from megatron_copd.training.checkpointing import CheckpointManager

    run_dir = Path(cfg.run_dir)
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    res = Resources(cfg)
    base = res.base_checkpoint(cfg)

    layout = BranchLayout(cfg.branch_names, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                          dp=cfg.parallel.dp, cp=cfg.parallel.cp)
    groups = build_branch_groups(layout)
    init_megatron_state(groups, cfg.seed)
    _log(f"layout: {layout.describe()}")
    schedule = Schedule(cfg)
    name = groups.branch_name
    branch = BranchModel(cfg, groups, res.tokenizer.image_token_id, schedule.total_steps)
    teachers = sorted({e.teacher for e in schedule.edges if e.student == name})
    data = BranchData(res.sources, name, teachers, cfg.seed, groups.branch)
    results: dict = {"domains": sorted(res.sources.eval)}

    ckpt = CheckpointManager(cfg.run_dir, groups, cfg, base_fingerprint=_fingerprint(base),
                             tokenizer_dir=res.tokenizer_dir)
    resumed = ckpt.load_latest(branch)
    if resumed is not None:
        state = resumed.engine_state
        schedule.load_state_dict(state["schedule"])
        data.load_state_dict(state["data"])
        results.update(state.get("results", {}))
        _log(f"resumed from {resumed.path} (step {resumed.iteration}/{schedule.total_steps})")
    elif base is not None:
        load_model(branch.model, groups.pgs, base, process_group=groups.branch_group)
        _log(f"branches start from {base}")

    def engine_state() -> dict:
        return {"schedule": schedule.state_dict(), "data": data.state_dict(), "results": results}

    rewards = RewardPool(num_workers=cfg.grpo.reward_workers, timeout_s=cfg.grpo.reward_timeout_s)
    reporter = Reporter(cfg, groups, schedule,
                        resume_step=resumed.iteration if resumed is not None else 0)
    cache: dict = {}
    domains = results["domains"]
    try:
        if cfg.eval.at_end and "base" not in results:
            # Every branch is still the base model: split the domains among the branches.
            full = _evaluate_split(cfg, groups, branch.model, res, rewards, domains, cache)
            results["base"] = _record_slices(results, "base", full)
            reporter.log_eval("base", results["base"], 0)
            _log("base accuracy: " + _fmt(results["base"]))

        step = RLStep(StepContext(cfg, groups, branch, res.tokenizer, data, rewards, cache))
        while not schedule.done():
            plan = schedule.peek()
            metrics, edge_metrics = step.run(plan)
            schedule.observe(reporter.step(plan, metrics, edge_metrics))
            schedule.advance()
            if ckpt.after_step(schedule.position, branch, engine_state, stop):
                _log("preempted: checkpoint written, exiting for requeue")
                return EXIT_REQUEUE
        ckpt.save(schedule.total_steps, branch, engine_state)
        ckpt.wait()

        if cfg.eval.at_end:
            acc = evaluate_all(cfg, groups, branch, res, rewards, domains, cache)
            results["branches"] = {
                n: _record_slices(results, n, a)
                for n, a in zip(layout.names, _gather_by_branch(acc, groups))
            }
            for n, a in results["branches"].items():
                reporter.log_eval(n, a, schedule.total_steps)
                _log(f"branch {n} accuracy: " + _fmt(a))
            merged = _merge_branches(cfg, groups, run_dir, base, schedule)
            if merged is not None:
                load_model(branch.model, groups.pgs, merged, process_group=groups.branch_group)
                full = _evaluate_split(cfg, groups, branch.model, res, rewards, domains, cache)
                results["merged"] = _record_slices(results, "merged", full)
                reporter.log_eval("merged", results["merged"], schedule.total_steps)
                _log("merged accuracy: " + _fmt(results["merged"]))
        if dist.get_rank() == 0:
            _write_json(run_dir / "results.json", results)
            _print_table(results)
    finally:
        ckpt.close()
        rewards.close()
        reporter.close()
    dist.barrier()
    return EXIT_OK


def _fingerprint(base: Path | None) -> str:
    if base is None:
        return "random-init"
    from megatron_copd.checkpoint.fingerprint import compute_fingerprint

    return compute_fingerprint(base)


def _record_slices(results: dict, model: str, evaluated: dict[str, dict]) -> dict[str, float]:
    """Keep each domain's per-slice accuracy under results["slices"][model]; return the
    domains' accuracies."""
    results.setdefault("slices", {})[model] = {d: e["slices"] for d, e in evaluated.items()}
    return {d: e["accuracy"] for d, e in evaluated.items()}


def _evaluate_split(cfg, groups, model, res, rewards, domains, cache) -> dict[str, dict]:
    """All branches hold the same weights: each evaluates a share of the domains."""
    mine = domains[groups.branch :: groups.layout.num_branches]
    acc = {d: evaluate_domain(cfg, groups, model, res.tokenizer, rewards, res.sources.eval[d],
                              cache) for d in mine}
    merged: dict = {}
    for part in _gather_by_branch(acc, groups):
        merged.update(part)
    return {d: merged[d] for d in domains}


def _merge_branches(cfg, groups, run_dir: Path, base: Path | None, schedule) -> Path | None:
    """Average the branches' final checkpoints (the tools/ merger's code) into run_dir/merged."""
    if groups.layout.num_branches < 2 or cfg.schedule.recipe not in ("copd", "grpo"):
        return None
    from megatron_copd.checkpoint.ckpt_dirs import iter_name
    from megatron_copd.checkpoint.merge import merge_checkpoints

    out = run_dir / "merged"
    inputs = [run_dir / "checkpoints" / n / iter_name(schedule.total_steps)
              for n in groups.layout.names]
    error = None
    if dist.get_rank() == 0:
        try:
            method = cfg.schedule.merge_method
            merge_checkpoints([str(p) for p in inputs], str(out), method=method,
                              base=str(base) if method == "task_arithmetic" else None,
                              overwrite=True)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = f"merging the branches failed: {e}"
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise RuntimeError(box[0])
    return out


def _print_table(results: dict) -> None:
    domains = results.get("domains", [])
    cols = [("base", results.get("base"))]
    cols += [(n, a) for n, a in results.get("branches", {}).items()]
    cols += [("merged", results.get("merged"))]
    cols = [(n, a) for n, a in cols if a]
    if not cols:
        return
    width = max(8, *(len(n) for n, _ in cols))
    print("\n" + "domain".ljust(10) + "".join(n.rjust(width + 2) for n, _ in cols))
    for d in [*domains, "overall"]:
        row = d.ljust(10)
        for _, a in cols:
            v = sum(a.values()) / len(a) if d == "overall" else a[d]
            row += f"{100 * v:.1f}%".rjust(width + 2)
        print(row)
    print(flush=True)


def _fmt(acc: dict[str, float]) -> str:
    return ", ".join(f"{d} {100 * v:.1f}%" for d, v in acc.items())


def run_evaluation(cfg: RunConfig, checkpoint: str) -> int:
    """`copd eval`: one checkpoint (a branch's iter dir, a merged or an imported model) on every
    domain's held-out set; the branches' ranks share the domains."""
    from megatron_copd.models.factory import build_model
    from megatron_copd.rewards import RewardPool

    init_distributed()
    res = Resources(cfg)
    layout = BranchLayout(cfg.branch_names, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                          dp=cfg.parallel.dp, cp=cfg.parallel.cp)
    groups = build_branch_groups(layout)
    init_megatron_state(groups, cfg.seed)
    model = build_model(cfg, groups.pgs, image_token_id=res.tokenizer.image_token_id)
    if torch.cuda.is_available():
        model.cuda()
    load_model(model, groups.pgs, checkpoint, process_group=groups.branch_group)
    domains = sorted(res.sources.eval)
    with RewardPool(num_workers=cfg.grpo.reward_workers, timeout_s=cfg.grpo.reward_timeout_s) as rw:
        full = _evaluate_split(cfg, groups, model, res, rw, domains, {})
    if dist.get_rank() == 0:
        acc = {d: e["accuracy"] for d, e in full.items()}
        slices = {d: e["slices"] for d, e in full.items()}
        print(json.dumps({"checkpoint": str(checkpoint), "accuracy": acc, "slices": slices},
                         indent=2))
    return 0
