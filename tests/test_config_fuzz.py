"""Property-based: for every run-config field and every prompt-record field, generated values
outside the field's domain (wrong type, out of range, unknown enum / name, empty or repeated
list, dangling branch reference, bad path) are refused in-process with one ConfigError /
DataError line naming that field, and nothing is written.

Bounded (derandomized, a handful of examples per field) so the whole file runs in seconds."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_copd.config import RunConfig, _load_with_bases, validate
from megatron_copd.config_base import ConfigError, apply_override, from_dict
from megatron_copd.config_checks import CONSTRAINTS, Bound, Each, Keys, Text, config_fields
from megatron_copd.data.records import KNOWN_FIELDS, PromptRecord, load_records
from megatron_copd.errors import DataError

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "megatron_copd" / "configs" / "toy_copd.yaml"
CLIP_TOY = REPO / "examples" / "toy" / "copd_clip.yaml"  # model.vision (the default: qwen_vl)
FIELDS = config_fields(RunConfig)
FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# Settings a field needs around it to be read at all (a section present, a topology that takes
# edges, the files world for data paths).
_FILES_WORLD = {"data.world": "files", "data.tokenizer": "tok",
                "branches.0.train_data": ["a.jsonl"], "branches.1.train_data": ["b.jsonl"]}
CONTEXT: dict[str, dict[str, Any]] = {
    "schedule.edges[].": {"schedule.topology": "custom",
                          "schedule.edges": [{"student": "text", "teacher": "image"}]},
    "schedule.drop_edges[].": {"schedule.topology": "all",
                               "schedule.drop_edges": [{"student": "text", "teacher": "image"}]},
    "schedule.hub": {"schedule.topology": "hub"},
    "branches[].train_data": _FILES_WORLD, "branches[].eval_data": _FILES_WORLD,
    "data.tokenizer": _FILES_WORLD,
}


def _base(name: str) -> dict:
    data = _load_with_bases(CLIP_TOY if name.startswith("model.vision.") else DEFAULT)
    for prefix, around in CONTEXT.items():
        if name.startswith(prefix):
            for k, v in around.items():
                apply_override(data, k.split("."), copy.deepcopy(v), RunConfig)
    return data


def _annotation(name: str) -> Any:
    tp: Any = RunConfig
    for part in name.replace("[]", "").split("."):
        tp = typing.get_type_hints(tp)[part]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = args[0] if len(args) == 1 else tp
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            tp = typing.get_args(tp)[0]
    return tp


_WORD = st.text(alphabet="xyzqw", min_size=1, max_size=6)  # never a number, bool or known name


def _wrong_type(tp: Any) -> st.SearchStrategy:
    """Values of another type than the annotation ``tp``."""
    if typing.get_origin(tp) is Literal:
        return _WORD.map(lambda s: "zz" + s) | st.integers()
    if tp is bool:
        return st.integers() | _WORD
    if tp is int:
        return (_WORD | st.booleans() | st.lists(st.integers(), min_size=1, max_size=2)
                | st.floats(allow_nan=False, allow_infinity=False).filter(
                    lambda x: not float(x).is_integer()))
    if tp is float:
        return _WORD | st.booleans() | st.lists(st.floats(), min_size=1, max_size=2)
    if tp is str:
        return st.integers() | st.booleans() | st.lists(_WORD, min_size=1, max_size=2)
    origin = typing.get_origin(tp)
    if origin is list:
        return _WORD | st.integers() | st.dictionaries(_WORD, st.integers(), min_size=1)
    if origin is dict:
        return _WORD | st.integers() | st.lists(st.integers(), min_size=1)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return st.lists(_WORD, min_size=1, max_size=2)  # bool | int | str unions: never a list
    raise AssertionError(f"no wrong-type strategy for {tp}")


def _outside(rule: Any, tp: Any) -> st.SearchStrategy | None:
    """Values of the right type outside the rule's domain."""
    integer = tp is int or typing.get_args(tp) == (int,)
    if isinstance(rule, Bound):
        parts = [st.sampled_from([math.nan, math.inf, -math.inf])] if not integer else []
        if rule.lo is not None:
            parts.append(st.integers(max_value=math.ceil(rule.lo) - (0 if rule.lo_open else 1))
                         if integer else st.floats(max_value=rule.lo, exclude_max=not rule.lo_open,
                                                   allow_nan=False, allow_infinity=False))
        if rule.hi is not None:
            parts.append(st.integers(min_value=math.floor(rule.hi) + (0 if rule.hi_open else 1))
                         if integer else st.floats(min_value=rule.hi, exclude_min=not rule.hi_open,
                                                   allow_nan=False, allow_infinity=False))
        if not parts:
            return None
        values = st.one_of(parts)
        return values.map(lambda v: [v]) if typing.get_origin(tp) is list else values
    if isinstance(rule, Text):
        return _bad_text(rule)
    if isinstance(rule, Each):
        cases = [_bad_text(rule.item).map(lambda s: [s])]
        if rule.nonempty:
            cases.append(st.just([]))
        if rule.unique:
            cases.append(st.just(["text", "text"]))
        return st.one_of(cases)
    if isinstance(rule, Keys):
        return _WORD.map(lambda s: {"not_a_field_" + s: 1})
    return None


def _bad_text(rule: Text) -> st.SearchStrategy:
    cases = [st.sampled_from(["", "   "])]
    if rule.pattern:
        cases.append(st.text(alphabet=" /.!:", min_size=1, max_size=4).map(lambda s: "a" + s))
    if rule.choices:
        cases.append(_WORD.map(lambda s: "zz" + s))
    return st.one_of(cases)


def _refused(name: str, value: Any) -> str:
    key = name.replace("[]", ".0")
    data = _base(name)
    apply_override(data, key.split("."), value, RunConfig)
    with pytest.raises(ConfigError) as e:
        validate(from_dict(RunConfig, data), check_device=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.split(":")[0].startswith(key), (key, value, msg)
    return msg


def test_every_base_is_accepted():
    """The contexts used below are valid on their own, so a refusal is the generated value's."""
    for name in {"model.vision.hidden_size", *(p for p in CONTEXT)}:
        validate(from_dict(RunConfig, _base(name)), check_device=False)


@pytest.mark.parametrize("name", FIELDS)
@FUZZ
@given(data=st.data())
def test_values_outside_a_fields_domain_are_refused_naming_it(name, data, tmp_path):
    tp = _annotation(name)
    strategies = [_wrong_type(tp)]
    outside = _outside(CONSTRAINTS[name], tp)
    if outside is not None:
        strategies.append(outside)
    value = data.draw(st.one_of(strategies), label=name)
    _refused(name, value)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", [n for n in FIELDS if "[]." in n and n.startswith("schedule.")])
def test_a_dangling_branch_reference_is_refused(name):
    msg = _refused(name, "video")
    assert "unknown branch 'video'" in msg


# ---------------------------------------------------------------------------------------------
# Records


GOOD_ROW = {"id": "a", "domain": "text", "prompt": "What is 1 + 1?", "answer": "2"}
_ANY_BAD = st.one_of(st.booleans(), st.lists(st.integers(), min_size=1, max_size=2),
                     st.dictionaries(_WORD, st.integers(), min_size=1, max_size=2))
_BLANK = st.sampled_from(["", "   "])
RECORD_BAD: dict[str, st.SearchStrategy] = {
    "id": st.one_of(st.just(None), _BLANK, _ANY_BAD, st.floats()),
    "domain": st.one_of(st.just(None), _BLANK, _ANY_BAD, st.integers(),
                        _WORD.map(lambda s: "zz" + s)),  # not a domain of the branch
    "prompt": st.one_of(st.just(None), _BLANK, _ANY_BAD, st.integers()),
    "answer": st.one_of(st.just(None), _BLANK, _ANY_BAD,
                        st.sampled_from([math.nan, math.inf, -math.inf])),
    "images": st.one_of(_WORD, st.integers(), st.lists(st.integers(), min_size=1, max_size=2),
                        _WORD.map(lambda s: [s + ".png"])),  # a missing file
    "video": st.one_of(st.just([]), st.integers(), st.dictionaries(_WORD, _WORD, min_size=1),
                       _WORD.map(lambda s: s + ".mp4"), st.lists(st.integers(), min_size=1)),
    "reward": st.one_of(_BLANK, _ANY_BAD, st.integers(), _WORD.map(lambda s: "zz" + s)),
    "meta": st.one_of(_WORD, st.integers(), st.lists(st.integers(), min_size=1)),
}
MISSING_REFUSED = ("id", "domain", "prompt", "answer")


def test_every_record_field_has_a_generator():
    assert set(RECORD_BAD) == set(KNOWN_FIELDS)
    assert {f.name for f in dataclasses.fields(PromptRecord)} == set(KNOWN_FIELDS)


@pytest.mark.parametrize("name", sorted(RECORD_BAD))
@FUZZ
@given(data=st.data())
def test_bad_record_values_are_refused_naming_file_line_and_field(name, data, tmp_path):
    row = dict(GOOD_ROW, id="b")
    missing = name in MISSING_REFUSED and data.draw(st.booleans(), label="missing")
    if missing:
        row.pop(name)
    else:
        row[name] = data.draw(RECORD_BAD[name], label=name)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\n" + json.dumps(row, allow_nan=True) + "\n")
    from megatron_copd.rewards import available_verifiers

    with pytest.raises(DataError) as e:
        load_records(path, known_rewards=available_verifiers(), domains=["text"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}:2: ") and name in msg, (row, msg)


@FUZZ
@given(field=st.sampled_from(["images", "video"]))
def test_media_on_a_text_only_model_is_refused(field, tmp_path):
    (tmp_path / "x.png").write_bytes(b"not read")
    row = dict(GOOD_ROW, **{field: ["x.png"]})
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"d.jsonl:1: field '{field}': .*no vision tower"):
        load_records(path, media=False)
