"""Per-step metrics from every branch to one place: metrics.jsonl, TensorBoard, the console.

Each branch's numbers are averaged over its DP ranks and reported by its rank at (tp 0, dp 0,
last pipeline stage), where losses and teacher scores live. One world-wide ``all_gather_object``
per step brings every record to every rank: rank 0 writes them, and every rank learns every
edge's overlap (the adaptive rhythm's decision must be the same everywhere).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from megatron_copd.training.schedule import Schedule, StepPlan
from megatron_copd.training.topology import Edge


def _dp_mean(metrics: dict[str, float], group) -> dict[str, float]:
    if group.size() == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    vec = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(vec, group=group)
    return {k: float(v) / group.size() for k, v in zip(keys, vec)}


class Reporter:
    def __init__(self, cfg, groups, schedule: Schedule, resume_step: int = 0) -> None:
        self.cfg = cfg
        self.groups = groups
        self.schedule = schedule
        self.t_start = time.perf_counter()
        self.steps_done = 0
        self.writer = None
        if dist.get_rank() == 0:
            from megatron_copd.metrics import MetricsWriter

            # Records after the resume point (written by the killed run) are dropped.
            last = {n: resume_step - 1 for n in cfg.branch_names}
            self.writer = MetricsWriter(cfg.run_dir, tensorboard=cfg.logging.tensorboard,
                                        resume_steps=last)

    @property
    def is_reporter(self) -> bool:
        g = self.groups
        return g.tp_rank == 0 and g.dp_rank == 0 and g.is_last_stage

    def step(self, plan: StepPlan, metrics: dict, edge_metrics: dict[Edge, dict]) -> dict[Edge, float]:
        g = self.groups
        name = g.branch_name
        metrics = _dp_mean(metrics, g.pgs.dp)
        records = []
        if self.is_reporter:
            base = {"cycle": plan.cycle, "step": plan.step, "recipe": self.cfg.schedule.recipe}
            records.append({**base, "branch": name, "phase": plan.branch_phase(name),
                            "trains": name in plan.trains, **metrics})
        # Edge metrics exist on the student's last stage; average over its DP ranks.
        for e in sorted({*plan.edges, *plan.probe_edges}):
            if e.student != name or not g.is_last_stage:
                continue
            em = _dp_mean(edge_metrics.get(e, {}), g.pgs.dp)
            if self.is_reporter:
                records.append({"cycle": plan.cycle, "step": plan.step, "branch": e.student,
                                "student": e.student, "teacher": e.teacher,
                                "phase": 2 if e in plan.edges else 1,
                                "probe": e not in plan.edges, **em})
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, records)
        flat = [r for part in gathered for r in part]
        self.steps_done += 1
        if self.writer is not None:
            for r in flat:
                self.writer.log(r)
            self._console(plan, flat)
        return {Edge(r["student"], r["teacher"]): r["overlap_top10"]
                for r in flat if "teacher" in r and "overlap_top10" in r}

    def _console(self, plan: StepPlan, flat: list[dict]) -> None:
        if not self.cfg.logging.progress:
            return
        total = self.schedule.total_steps
        elapsed = time.perf_counter() - self.t_start
        eta = elapsed / self.steps_done * (total - plan.step - 1)
        parts = []
        for r in flat:
            if "teacher" in r:
                if "overlap_top10" in r:
                    parts.append(f"{r['student']}<-{r['teacher']} ov {r['overlap_top10']:.3f}")
            elif "reward_mean" in r:
                parts.append(f"{r['branch']} r {r['reward_mean']:.2f}")
        print(f"[copd] step {plan.step + 1}/{total} cycle {plan.cycle} phase {plan.phase} | "
              + " | ".join(parts) + f" | {elapsed:.0f}s, eta {eta:.0f}s", flush=True)

    def log_eval(self, model: str, accuracy: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for domain, acc in accuracy.items():
                self.writer.log({"kind": "eval", "model": model, "domain": domain,
                                 "accuracy": acc, "step": step})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
