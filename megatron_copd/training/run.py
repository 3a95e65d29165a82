"""A training run on this rank: set up the world, the branches and their data, run the schedule,
checkpoint, merge the branches and evaluate base / branches / merged model on every domain.

All branches run in one torch.distributed world; this module only orchestrates — the math is in
``algorithms/``, the per-step work in ``rl_step``, the megatron wiring in ``branch_model``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from megatron_copd.checkpoint.model_io import load_model
from megatron_copd.config import RunConfig, to_dict
from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
from megatron_copd.runtime.distributed import init_distributed
from megatron_copd.runtime.megatron_state import init_megatron_state
from megatron_copd.training.branch_data import BranchData, file_sources, toy_sources
from megatron_copd.training.branch_model import BranchModel
from megatron_copd.training.evaluation import evaluate_domain
from megatron_copd.training.reporting import Reporter
from megatron_copd.training.rl_step import RLStep, StepContext
from megatron_copd.training.schedule import Schedule
from megatron_copd.training.topology import Edge, teachers_of


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
            from megatron_copd.data.toy.vocab import build_toy_tokenizer
            from megatron_copd.data.toy.world import build_toy_world

            cache = cache_dir(cfg)
            self.world = build_toy_world(
                cache, seed=cfg.data.base_seed, train_size=cfg.data.train_size,
                eval_size=cfg.data.eval_size,
            )
            self.tokenizer = build_toy_tokenizer(self.world)
            self.tokenizer_dir = str(self.tokenizer.path)
            self.sources = toy_sources(cfg, self.world)
        else:
            if not cfg.data.tokenizer:
                from megatron_copd.config import ConfigError

                raise ConfigError("data.tokenizer: required when data.world is 'files'")
            self.tokenizer = Tokenizer.load(cfg.data.tokenizer)
            self.tokenizer_dir = cfg.data.tokenizer
            self.sources = file_sources(cfg)

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
    init_distributed()
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
    if base is not None:
        load_model(branch.model, groups.pgs, base, process_group=groups.branch_group)
        _log(f"branches start from {base}")
    teachers = sorted({e.teacher for e in schedule.edges if e.student == name})
    data = BranchData(res.sources, name, teachers, cfg.seed, groups.branch)

    from megatron_copd.rewards import RewardPool

    rewards = RewardPool(num_workers=cfg.grpo.reward_workers, timeout_s=cfg.grpo.reward_timeout_s)
    reporter = Reporter(cfg, groups, schedule)
    cache: dict = {}
    domains = sorted(res.sources.eval)
    results: dict = {"domains": domains}
    try:
        # Base accuracy: every branch is the base at step 0; split the domains among them.
        if cfg.eval.at_end and schedule.position == 0:
            mine = domains[groups.branch :: layout.num_branches]
            acc = evaluate_all(cfg, groups, branch, res, rewards, mine, cache)
            base_acc = {}
            for part in _gather_by_branch(acc, groups):
                base_acc.update(part)
            results["base"] = {d: base_acc[d]["accuracy"] for d in domains}
            _log("base accuracy: " + _fmt(results["base"]))

        ctx = StepContext(cfg, groups, branch, res.tokenizer, data, rewards, cache)
        step = RLStep(ctx)
        while not schedule.done():
            plan = schedule.peek()
            metrics, edge_metrics = step.run(plan)
            overlaps = reporter.step(plan, metrics, edge_metrics)
            schedule.observe(overlaps)
            schedule.advance()

        # Final evaluation: each branch on every domain.
        if cfg.eval.at_end:
            acc = evaluate_all(cfg, groups, branch, res, rewards, domains, cache)
            results["branches"] = {
                n: {d: a[d]["accuracy"] for d in domains}
                for n, a in zip(layout.names, _gather_by_branch(acc, groups))
            }
            for n, a in results["branches"].items():
                _log(f"branch {n} accuracy: " + _fmt(a))
        if dist.get_rank() == 0:
            _write_json(run_dir / "results.json", results)
    finally:
        rewards.close()
        reporter.close()
    dist.barrier()
    return 0


def _fmt(acc: dict[str, float]) -> str:
    return ", ".join(f"{d} {100 * v:.1f}%" for d, v in acc.items())


def run_evaluation(cfg: RunConfig, checkpoint: str) -> int:
    init_distributed()
    res = Resources(cfg)
    layout = BranchLayout(cfg.branch_names, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                          dp=cfg.parallel.dp, cp=cfg.parallel.cp)
    groups = build_branch_groups(layout)
    init_megatron_state(groups, cfg.seed)
    from megatron_copd.models.factory import build_model
    from megatron_copd.rewards import RewardPool

    model = build_model(cfg, groups.pgs, image_token_id=res.tokenizer.image_token_id)
    if torch.cuda.is_available():
        model.cuda()
    load_model(model, groups.pgs, checkpoint, process_group=groups.branch_group)

    class _M:  # evaluate_all expects an object with `.model`
        pass

    holder = _M()
    holder.model = model
    domains = sorted(res.sources.eval)
    mine = domains[groups.branch :: layout.num_branches]
    with RewardPool(num_workers=cfg.grpo.reward_workers, timeout_s=cfg.grpo.reward_timeout_s) as rw:
        acc = evaluate_all(cfg, groups, holder, res, rw, mine, {})
    merged: dict = {}
    for part in _gather_by_branch(acc, groups):
        merged.update(part)
    if dist.get_rank() == 0:
        out = {d: merged[d]["accuracy"] for d in domains}
        print(json.dumps({"checkpoint": checkpoint, "accuracy": out}, indent=2))
    return 0
