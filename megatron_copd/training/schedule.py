"""What every branch does at every step, for every recipe, as one resumable iterator.

A step's plan says which branches update (``trains``), which distillation edges are active
(the student adds OPD samples scored by the teacher) and which edges are only probed (overlap
measured, nothing trained). Recipes are schedules over the same engine:

- ``copd``: N cycles of S_RL phase-I steps (GRPO) then S_OPD phase-II steps (GRPO + mutual OPD
  on every edge), all branches updating;
- ``grpo`` / ``mixed_rlvr``: GRPO only, ``steps`` steps (mixed RLVR = one branch whose domains are
  the union of the experts');
- ``static_opd``: the branches train alone for N*S_RL steps, then N*S_OPD OPD steps in which only
  students update and teachers are frozen (the same step totals as CoPD, ordered differently);
- ``mopd``: the experts train alone for N*S_RL steps while the student waits, then the student
  distils from every expert for N*S_OPD steps (experts frozen).

With ``schedule.adaptive`` (copd only) the phase is decided per edge from the measured top-k
overlap: an edge enters OPD when its overlap falls below ``overlap_floor`` and leaves above
``overlap_ceiling``; while an edge is not distilling its overlap is probed each step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_copd.config import ConfigError, RunConfig
from megatron_copd.training.topology import Edge, build_edges


@dataclass(frozen=True)
class StepPlan:
    step: int  # global step, 0-based
    cycle: int
    phase: int  # 1 = RL only, 2 = RL + OPD (per branch see `branch_phase`)
    step_in_phase: int
    trains: frozenset[str]
    edges: tuple[Edge, ...]  # active distillation edges
    probe_edges: tuple[Edge, ...] = ()
    native: frozenset[str] = field(default_factory=frozenset)  # branches with a GRPO batch

    def branch_phase(self, branch: str) -> int:
        return 2 if any(e.student == branch for e in self.edges) else 1


class Schedule:
    """Iterates StepPlans; ``observe()`` feeds measured edge overlaps (adaptive mode)."""

    def __init__(self, cfg: RunConfig) -> None:
        s = cfg.schedule
        self.cfg = cfg
        self.recipe = s.recipe
        self.branches = cfg.branch_names
        self.edges = build_edges(s, self.branches) if s.recipe in ("copd", "static_opd", "mopd") else []
        if self.recipe in ("copd", "static_opd", "mopd") and not self.edges and len(self.branches) > 1:
            raise ConfigError(f"schedule.recipe: '{self.recipe}' needs at least one edge")
        self.total_steps = self._total_steps()
        self.position = 0
        # adaptive state: edges currently distilling
        self.distilling: set[Edge] = set()
        self.last_overlap: dict[Edge, float] = {}
        self._validate()

    # ------------------------------------------------------------------ static structure
    def _total_steps(self) -> int:
        s = self.cfg.schedule
        if self.recipe in ("grpo", "mixed_rlvr"):
            return s.steps if s.steps is not None else s.cycles * (s.s_rl + s.s_opd)
        return s.cycles * (s.s_rl + s.s_opd)

    def _validate(self) -> None:
        if self.recipe == "static_opd":
            both = {e.student for e in self.edges} & {e.teacher for e in self.edges}
            if both:
                raise ConfigError(
                    f"schedule.edges: in static_opd branch {sorted(both)[0]!r} cannot be both "
                    "student and (frozen) teacher; run one direction per run"
                )
        if self.recipe == "mopd":
            students = {e.student for e in self.edges}
            if len(students) != 1:
                raise ConfigError(
                    f"schedule.edges: mopd needs exactly one student, got {sorted(students)}"
                )
        if self.cfg.schedule.adaptive and self.recipe != "copd":
            raise ConfigError("schedule.adaptive: only the copd recipe has an adaptive rhythm")

    @property
    def students(self) -> set[str]:
        return {e.student for e in self.edges}

    @property
    def teachers(self) -> set[str]:
        return {e.teacher for e in self.edges}

    # ------------------------------------------------------------------ iteration
    def done(self) -> bool:
        return self.position >= self.total_steps

    def peek(self) -> StepPlan:
        return self.plan(self.position)

    def advance(self) -> None:
        self.position += 1

    def plan(self, step: int) -> StepPlan:
        s = self.cfg.schedule
        everyone = frozenset(self.branches)
        period = s.s_rl + s.s_opd
        if self.recipe in ("grpo", "mixed_rlvr"):
            return StepPlan(step, 0, 1, step, everyone, (), (), everyone)
        if self.recipe == "copd":
            cycle, within = divmod(step, max(1, period))
            if s.adaptive:
                active = tuple(sorted(self.distilling))
                probes = tuple(e for e in self.edges if e not in self.distilling)
                phase = 2 if active else 1
                return StepPlan(step, cycle, phase, within, everyone, active, probes, everyone)
            if within < s.s_rl:
                probes = tuple(self.edges) if s.probe_overlap_phase1 else ()
                return StepPlan(step, cycle, 1, within, everyone, (), probes, everyone)
            return StepPlan(step, cycle, 2, within - s.s_rl, everyone, tuple(self.edges), (), everyone)
        # static_opd / mopd: stage A then stage B.
        stage_a = s.cycles * s.s_rl
        if step < stage_a:
            learners = everyone - self.students if self.recipe == "mopd" else everyone
            return StepPlan(step, 0, 1, step, frozenset(learners), (), (), frozenset(learners))
        students = frozenset(self.students)
        native = students if self.recipe == "static_opd" else frozenset()
        return StepPlan(step, 1, 2, step - stage_a, students, tuple(self.edges), (), native)

    # ------------------------------------------------------------------ adaptive rhythm
    def observe(self, overlaps: dict[Edge, float]) -> None:
        """Update per-edge OPD state from this step's measured overlaps (adaptive mode)."""
        self.last_overlap.update(overlaps)
        if not self.cfg.schedule.adaptive:
            return
        s = self.cfg.schedule
        for edge, value in overlaps.items():
            if edge in self.distilling and value > s.overlap_ceiling:
                self.distilling.discard(edge)
            elif edge not in self.distilling and value < s.overlap_floor:
                self.distilling.add(edge)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "distilling": sorted([e.student, e.teacher] for e in self.distilling),
            "last_overlap": [[e.student, e.teacher, v] for e, v in sorted(self.last_overlap.items())],
        }

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
        self.distilling = {Edge(s, t) for s, t in state.get("distilling", [])}
        self.last_overlap = {Edge(s, t): float(v) for s, t, v in state.get("last_overlap", [])}
