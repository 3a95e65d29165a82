"""Prompt records: loading JSONL/Parquet and every validation message."""

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_copd.data.records import PromptRecord, load_many, load_records, write_jsonl
from megatron_copd.errors import DataError, UserError


def _write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _row(i: int, **kw) -> dict:
    row = {"id": f"r{i}", "domain": "text", "prompt": f"What is {i} + 1?", "answer": str(i + 1)}
    row.update(kw)
    return row


@pytest.fixture
def media(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png", "f0.png", "f1.png", "clip.mp4"):
        (tmp_path / "img" / name).write_bytes(b"x")
    return tmp_path


def test_jsonl_full_record_paths_resolved_and_meta(media: Path):
    path = _write_jsonl(
        media / "train.jsonl",
        [
            _row(0, images=["img/a.png", "img/b.png"], reward="math", source="gsm", level=3),
            "",  # blank lines are skipped
            _row(1, video=["img/f0.png", "img/f1.png"], meta={"k": 1}),
            _row(2, video="img/clip.mp4", answer=0.5, id=7),
        ],
    )
    recs = load_records(path)
    assert [r.id for r in recs] == ["r0", "r1", "7"]
    r0 = recs[0]
    assert r0.images == [str(media / "img/a.png"), str(media / "img/b.png")]
    assert r0.reward == "math" and r0.video is None
    assert r0.meta == {"source": "gsm", "level": 3}
    assert recs[1].video == [str(media / "img/f0.png"), str(media / "img/f1.png")]
    assert recs[1].meta == {"k": 1} and recs[1].reward is None
    assert recs[2].video == str(media / "img/clip.mp4")
    assert recs[2].answer == "0.5"  # numbers are accepted and converted


def test_relative_paths_resolve_against_data_dir_not_cwd(media: Path, monkeypatch):
    sub = media / "data"
    sub.mkdir()
    (sub / "pic.png").write_bytes(b"x")
    path = _write_jsonl(sub / "t.jsonl", [_row(0, images=["pic.png"])])
    monkeypatch.chdir(media)
    assert load_records("data/t.jsonl")[0].images == [str(sub / "pic.png")]


def test_integer_answer_and_default_domain(tmp_path: Path):
    row = {"id": "a", "prompt": "p", "answer": 1000}
    path = _write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing field 'domain'$"):
        load_records(path)
    rec = load_records(path, default_domain="text")[0]
    assert rec.domain == "text" and rec.answer == "1000"


BAD_ROWS = [
    (_row(0, answer=True), "field 'answer': expected a string, got true"),
    (_row(0, answer=[3]), "field 'answer': expected a string, got [3]"),
    (_row(0, answer=None), "field 'answer': expected a string, got null"),
    (_row(0, answer="  "), "field 'answer': expected a non-empty string, got \"  \""),
    ({"id": "x", "domain": "t", "answer": "1"}, "missing field 'prompt'"),
    ({"id": "x", "domain": "t", "prompt": "p"}, "missing field 'answer'"),
    ({"domain": "t", "prompt": "p", "answer": "1"}, "missing field 'id'"),
    (_row(0, id=1.5), "field 'id': expected a non-empty string or an integer, got 1.5"),
    (_row(0, prompt=3), "field 'prompt': expected a string, got 3"),
    (_row(0, domain=""), "field 'domain': expected a non-empty string, got \"\""),
    (_row(0, images="a.png"), "field 'images': expected a list of file paths, got \"a.png\""),
    (_row(0, images=[3]), "images[0]: expected a file path (string), got 3"),
    (_row(0, video=[]), "field 'video': expected a video file path or a non-empty list"),
    (_row(0, video=5), "field 'video': expected a video file path or a non-empty list"),
    (_row(0, reward=2), "field 'reward': expected a string, got 2"),
    (_row(0, meta=[1]), "field 'meta': expected a mapping, got [1]"),
    ([1, 2], "expected a JSON object (one record per line), got a list"),
    ('{"id": "x", "prompt": }', "invalid JSON (Expecting value at column 23)"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_bad_row_names_file_line_and_field(tmp_path: Path, row, message):
    path = _write_jsonl(tmp_path / "train.jsonl", [_row(1), _row(2), row])
    with pytest.raises(DataError) as ei:
        load_records(path)
    text = str(ei.value)
    assert text.startswith(f"{path}:3: "), text
    assert message in text
    assert "\n" not in text
    assert isinstance(ei.value, UserError)


def test_missing_media_file_is_reported_with_index(media: Path):
    path = _write_jsonl(media / "t.jsonl", [_row(0, images=["img/a.png", "img/nope.png"])])
    with pytest.raises(DataError) as ei:
        load_records(path)
    assert str(ei.value) == f"{path}:1: images[1]: file not found: {media / 'img/nope.png'}"
    path = _write_jsonl(media / "v.jsonl", [_row(0, video=["img/f0.png", "img/gone.png"])])
    with pytest.raises(DataError, match=re.escape(f"v.jsonl:1: video[1]: file not found: ")):
        load_records(path)
    path = _write_jsonl(media / "w.jsonl", [_row(0, video="clip.mp4")])
    with pytest.raises(DataError, match=r"w\.jsonl:1: video: file not found: .*clip\.mp4$"):
        load_records(path)
    # check_media=False defers the check (e.g. media on a mount that appears later)
    assert load_records(path, check_media=False)[0].video == str(media / "clip.mp4")


def test_duplicate_ids_within_and_across_files(tmp_path: Path):
    path = _write_jsonl(tmp_path / "a.jsonl", [_row(0), _row(1), _row(0)])
    with pytest.raises(DataError) as ei:
        load_records(path)
    assert str(ei.value) == f"{path}:3: duplicate id 'r0' (first at {path}:1)"
    b = _write_jsonl(tmp_path / "b.jsonl", [_row(5), _row(1)])
    c = _write_jsonl(tmp_path / "c.jsonl", [_row(1)])
    with pytest.raises(DataError) as ei:
        load_many([b, c])
    assert str(ei.value) == f"{c}:1: duplicate id 'r1' (first at {b}:2)"


def test_unknown_reward_name_when_known_set_given(tmp_path: Path):
    path = _write_jsonl(tmp_path / "a.jsonl", [_row(0, reward="maths")])
    assert load_records(path)[0].reward == "maths"  # not checked without a known set
    with pytest.raises(DataError, match=r"a\.jsonl:1: field 'reward': unknown verifier 'maths'"):
        load_records(path, known_rewards={"math", "exact"})


def test_file_level_errors(tmp_path: Path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found$"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("id,prompt\n")
    with pytest.raises(DataError, match=r"d\.csv: unsupported file type '\.csv'; expected"):
        load_records(tmp_path / "d.csv")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        load_records(tmp_path / "bad.parquet")
    (tmp_path / "u.jsonl").write_bytes(json.dumps(_row(0)).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"u\.jsonl:2: not valid UTF-8"):
        load_records(tmp_path / "u.jsonl")
    with pytest.raises(DataError, match="no data files given"):
        load_many([])


def test_parquet_roundtrip_and_row_index_errors(media: Path):
    rows = [_row(i, images=["img/a.png"] if i == 1 else None) for i in range(4)]
    table = pa.Table.from_pylist(rows)
    path = media / "train.parquet"
    pq.write_table(table, path)
    recs = load_records(path)
    assert [r.prompt for r in recs] == [r["prompt"] for r in rows]
    assert recs[1].images == [str(media / "img/a.png")] and recs[0].images == []

    bad = [dict(r) for r in rows]
    bad[2]["answer"] = None  # a null in a string column
    pq.write_table(pa.Table.from_pylist(bad), path)
    with pytest.raises(DataError) as ei:
        load_records(path)
    assert str(ei.value) == f"{path}: row index 2: field 'answer': expected a string, got null"

    ints = pa.table(
        {"id": ["a", "b"], "domain": ["t", "t"], "prompt": ["p", "q"], "answer": [1, 3]}
    )
    pq.write_table(ints, path)
    assert [r.answer for r in load_records(path)] == ["1", "3"]
    no_prompt = pa.table({"id": ["a"], "domain": ["t"], "answer": ["1"]})
    pq.write_table(no_prompt, path)
    with pytest.raises(DataError, match=r"train\.parquet: row index 0: missing field 'prompt'$"):
        load_records(path)


def test_load_many_concatenates_in_order_and_write_jsonl_roundtrips(media: Path):
    a = _write_jsonl(media / "a.jsonl", [_row(0), _row(1, images=["img/a.png"], extra="e")])
    pq.write_table(pa.Table.from_pylist([_row(2), _row(3)]), media / "b.parquet")
    recs = load_many([a, media / "b.parquet"])
    assert [r.id for r in recs] == ["r0", "r1", "r2", "r3"]
    out = media / "out" / "c.jsonl"
    out.parent.mkdir()
    write_jsonl(recs, out)
    assert not (media / "out" / "c.jsonl.tmp").exists()
    again = load_records(out)
    assert again == recs
    assert isinstance(again[1], PromptRecord) and again[1].meta == {"extra": "e"}
