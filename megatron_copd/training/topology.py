"""Distillation topology: which branch (student) learns from which peer (teacher).

An edge ``Edge(student, teacher)`` means: the student rolls out on the teacher's prompts with
its own policy and the teacher scores those rollouts with its current weights. The paper's
settings are configurations of the same edge list:

- ``pair``: two branches, both directions;
- ``hub``: the hub exchanges with every other branch, both directions (3-branch setting, text hub);
- ``all``: every ordered pair;
- ``custom``: exactly ``schedule.edges``.

``schedule.drop_edges`` removes edges afterwards (the one-direction ablations).
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

from megatron_copd.config_base import ConfigError

if TYPE_CHECKING:  # the run config imports this module to validate edges before launch
    from megatron_copd.config import ScheduleConfig


@dataclass(frozen=True, order=True)
class Edge:
    student: str
    teacher: str

    def __str__(self) -> str:
        return f"{self.student}<-{self.teacher}"

    @property
    def tag(self) -> str:
        """Name used in metrics and TensorBoard: student->teacher."""
        return f"{self.student}->{self.teacher}"


def build_edges(schedule: "ScheduleConfig", branches: tuple[str, ...]) -> list[Edge]:
    """The validated, sorted edge list for a config (empty for recipes without distillation)."""
    names = list(branches)
    if schedule.edges and schedule.topology != "custom":
        raise ConfigError(
            f"schedule.edges: used only with schedule.topology 'custom' (it is "
            f"'{schedule.topology}', whose edges are fixed); set topology: custom, or remove the "
            "edges (drop_edges removes edges from a fixed topology)"
        )
    if schedule.hub is not None and schedule.topology != "hub":
        raise ConfigError(f"schedule.hub: used only with schedule.topology 'hub' (it is "
                          f"'{schedule.topology}')")
    if schedule.topology == "pair":
        if len(names) != 2:
            raise ConfigError(
                f"schedule.topology: 'pair' needs exactly 2 branches, got {len(names)} {names}; "
                "use 'hub', 'all' or 'custom'"
            )
        edges = {Edge(names[0], names[1]), Edge(names[1], names[0])}
    elif schedule.topology == "hub":
        hub = schedule.hub or names[0]
        _check_branch(hub, names, "schedule.hub")
        edges = set()
        for other in names:
            if other != hub:
                edges |= {Edge(hub, other), Edge(other, hub)}
    elif schedule.topology == "all":
        edges = {Edge(s, t) for s in names for t in names if s != t}
    else:
        edges = set()
        if not schedule.edges:
            raise ConfigError("schedule.edges: topology 'custom' needs at least one edge")
        for i, e in enumerate(schedule.edges):
            _check_edge(e.student, e.teacher, names, f"schedule.edges.{i}")
            edges.add(Edge(e.student, e.teacher))
    for i, e in enumerate(schedule.drop_edges):
        _check_edge(e.student, e.teacher, names, f"schedule.drop_edges.{i}")
        edge = Edge(e.student, e.teacher)
        if edge not in edges:
            raise ConfigError(
                f"schedule.drop_edges.{i}: edge {edge.tag} is not in the '{schedule.topology}' "
                "topology"
            )
        edges.discard(edge)
    result = sorted(edges)
    if schedule.recipe == "copd" and len(names) > 1:
        connected = {e.student for e in result} | {e.teacher for e in result}
        lonely = [n for n in names if n not in connected]
        if lonely:
            raise ConfigError(
                f"schedule: branch {lonely[0]!r} has no distillation edge (disconnected); "
                "add an edge or remove the branch"
            )
    return result


def _check_branch(name: str, names: list[str], key: str) -> None:
    if name not in names:
        raise ConfigError(f"{key}: unknown branch {name!r}; branches are {names}")


def _check_edge(student: str, teacher: str, names: list[str], key: str) -> None:
    _check_branch(student, names, f"{key}.student")
    _check_branch(teacher, names, f"{key}.teacher")
    if student == teacher:
        raise ConfigError(f"{key}: self-edge {student}->{teacher}; a branch cannot teach itself")


def teachers_of(edges: list[Edge], student: str) -> list[str]:
    return [e.teacher for e in edges if e.student == student]


def students_of(edges: list[Edge], teacher: str) -> list[str]:
    return [e.student for e in edges if e.teacher == teacher]
