"""Topology validation and the step plans of every recipe (pure, no processes)."""

import pytest

from megatron_copd.config import ConfigError, RunConfig
from megatron_copd.config_base import from_dict
from megatron_copd.training.schedule import Schedule
from megatron_copd.training.topology import Edge, build_edges


def cfg(branches=("text", "image"), **schedule):
    return from_dict(RunConfig, {"branches": [{"name": b} for b in branches], "schedule": schedule})


def test_pair_hub_all_custom_and_drops():
    assert build_edges(cfg().schedule, ("text", "image")) == [Edge("image", "text"), Edge("text", "image")]
    hub = cfg(("text", "image", "video"), topology="hub", hub="text")
    assert set(build_edges(hub.schedule, hub.branch_names)) == {
        Edge("text", "image"), Edge("image", "text"), Edge("text", "video"), Edge("video", "text")}
    assert len(build_edges(cfg(("a", "b", "c"), topology="all").schedule, ("a", "b", "c"))) == 6
    drop = cfg(drop_edges=[{"student": "text", "teacher": "image"}])
    assert build_edges(drop.schedule, drop.branch_names) == [Edge("image", "text")]


@pytest.mark.parametrize("schedule, message", [
    ({"topology": "custom", "edges": [{"student": "text", "teacher": "audio"}]},
     "schedule.edges.0.teacher: unknown branch 'audio'"),
    ({"topology": "custom", "edges": [{"student": "text", "teacher": "text"}]},
     "schedule.edges.0: self-edge text->text"),
    ({"topology": "hub", "hub": "video"}, "schedule.hub: unknown branch 'video'"),
    ({"drop_edges": [{"student": "text", "teacher": "image"}, {"student": "image", "teacher": "text"}]},
     "branch 'text' has no distillation edge (disconnected)"),
])
def test_topology_errors(schedule, message):
    c = cfg(**schedule)
    with pytest.raises(ConfigError) as e:
        build_edges(c.schedule, c.branch_names)
    assert message in str(e.value)


def test_hub_leaves_no_branch_disconnected_and_pair_needs_two():
    c = cfg(("text", "image", "video"), topology="custom",
            edges=[{"student": "text", "teacher": "image"}, {"student": "image", "teacher": "text"}])
    with pytest.raises(ConfigError, match="'video' has no distillation edge"):
        build_edges(c.schedule, c.branch_names)
    with pytest.raises(ConfigError, match="'pair' needs exactly 2 branches"):
        c3 = cfg(("a", "b", "c"))
        build_edges(c3.schedule, c3.branch_names)


def test_copd_plan_alternates_phases():
    s = Schedule(cfg(cycles=2, s_rl=3, s_opd=2))
    plans = [s.plan(i) for i in range(s.total_steps)]
    assert s.total_steps == 10
    assert [p.phase for p in plans] == [1, 1, 1, 2, 2] * 2
    assert [p.cycle for p in plans] == [0] * 5 + [1] * 5
    assert all(p.trains == {"text", "image"} for p in plans)
    assert plans[3].edges == (Edge("image", "text"), Edge("text", "image"))
    assert plans[0].edges == ()


def test_static_opd_freezes_teacher_and_mopd_waits_student():
    s = Schedule(cfg(recipe="static_opd", topology="custom", cycles=2, s_rl=3, s_opd=2,
                     edges=[{"student": "text", "teacher": "image"}]))
    plans = [s.plan(i) for i in range(s.total_steps)]
    assert [p.phase for p in plans] == [1] * 6 + [2] * 4
    assert all(p.trains == {"text", "image"} for p in plans[:6])
    assert all(p.trains == {"text"} and p.edges == (Edge("text", "image"),) for p in plans[6:])
    m = Schedule(cfg(("student", "text", "image"), recipe="mopd", topology="custom", cycles=1,
                     s_rl=2, s_opd=2, edges=[{"student": "student", "teacher": "text"},
                                             {"student": "student", "teacher": "image"}]))
    plans = [m.plan(i) for i in range(m.total_steps)]
    assert plans[0].trains == {"text", "image"} and plans[2].trains == {"student"}
    assert plans[2].native == frozenset()
    with pytest.raises(ConfigError, match="cannot be both student and"):
        Schedule(cfg(recipe="static_opd"))


def test_adaptive_rhythm_follows_overlap_and_resumes():
    s = Schedule(cfg(adaptive=True, overlap_floor=0.8, overlap_ceiling=0.9))
    p = s.peek()
    assert p.phase == 1 and set(p.probe_edges) == set(s.edges)
    s.observe({Edge("text", "image"): 0.7, Edge("image", "text"): 0.85})
    s.advance()
    p = s.peek()
    assert p.edges == (Edge("text", "image"),) and p.probe_edges == (Edge("image", "text"),)
    assert p.branch_phase("text") == 2 and p.branch_phase("image") == 1
    state = s.state_dict()
    s2 = Schedule(cfg(adaptive=True, overlap_floor=0.8, overlap_ceiling=0.9))
    s2.load_state_dict(state)
    assert s2.peek() == p
    s.observe({Edge("text", "image"): 0.95})
    s.advance()
    assert s.peek().edges == ()
