"""Real-dataset converters: math sets with boxed / GSM8K / DAPO answers, image and video QA in
JSONL and Parquet with embedded media, an energon-prepared WebDataset, and bad rows."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_copd.data.real import (
    convert_energon,
    convert_image_qa,
    convert_math,
    convert_video_qa,
)
from megatron_copd.data.records import load_records
from megatron_copd.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def _png(colour, size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_math_layouts(tmp_path):
    rows = [
        {"problem": "What is 1/2 + 1/4?", "answer": "\\frac{3}{4}"},  # Polaris
        {"question": "Tom has 3 apples...", "answer": "He has 3+4=7.\n#### 1,007"},  # GSM8K
        {"problem": "Find x.", "solution": "So $x = \\boxed{\\frac{1}{\\sqrt{2}}}$.",
         "level": "Level 3"},  # MATH
        {"prompt": [{"role": "system", "content": "s"},
                    {"role": "user", "content": "Compute 2+2. Put it in \\boxed{}."}],
         "reward_model": {"ground_truth": "4"}, "id": "dapo-9"},  # DAPO / verl
    ]
    out = tmp_path / "math.jsonl"
    assert convert_math(_jsonl(tmp_path / "src.jsonl", rows), out).written == 4
    recs = load_records(out)
    assert [r.answer for r in recs] == ["\\frac{3}{4}", "1007", "\\frac{1}{\\sqrt{2}}", "4"]
    assert recs[0].prompt.endswith("within \\boxed{}.") and recs[0].reward == "math"
    assert recs[3].prompt == "Compute 2+2. Put it in \\boxed{}."  # already asks for a box
    assert recs[3].id == "src-dapo-9" and recs[2].meta["level"] == "Level 3"
    assert {r.domain for r in recs} == {"math"}
    # the same from Parquet
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "src.parquet")
    assert convert_math(tmp_path / "src.parquet", tmp_path / "m2.jsonl").written == 1


def test_math_bad_row_names_file_and_line(tmp_path):
    src = _jsonl(tmp_path / "bad.jsonl", [{"problem": "ok", "answer": "1"}, {"problem": "x"}])
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match=r"bad.jsonl:2: no field for an answer"):
        convert_math(src, out, strict=True)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    report = convert_math(src, out)  # default: skipped and counted
    assert report.written == 1
    assert report.skips.lines() == ["skipped 1 row(s) without an answer: line 2"]


def test_image_qa_parquet_with_embedded_images_and_choices(tmp_path):
    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    rows = [
        {"id": 1, "question": "<image>\nWhat colour?", "answers": ["red", "red", "pink"],
         "image": {"bytes": red, "path": None}},
        {"id": 2, "question": "Which is blue?", "choices": ["left", "right"], "answer": "right",
         "image": {"bytes": blue, "path": None}},
        {"id": 3, "query": "Same image again?", "answer": "yes",
         "image": {"bytes": red, "path": None}},
    ]
    keys = sorted({k for r in rows for k in r})  # Parquet: one schema, None where absent
    rows = [{k: r.get(k) for k in keys} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "vqa.parquet")
    out = tmp_path / "data" / "vqa.jsonl"
    assert convert_image_qa(tmp_path / "vqa.parquet", out).written == 3
    recs = load_records(out)
    assert [r.answer for r in recs] == ["red", "B", "yes"]
    assert recs[1].prompt.startswith("Which is blue?\nA. left\nB. right\n")
    assert recs[1].reward == "choice" and recs[0].reward == "exact"  # a word: exact
    assert recs[0].images == recs[2].images  # the same bytes stored once
    assert Path(recs[0].images[0]).read_bytes() == red
    # stored relative to the JSONL, so the folder can move
    line = json.loads(out.read_text().splitlines()[0])
    assert line["images"][0].startswith("vqa_media/")


def test_image_qa_paths_llava_conversations_and_errors(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png((0, 255, 0)))
    rows = [{"id": "x", "image": "img/a.png", "conversations": [
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "green"}]},
        {"id": "y", "images": ["img/a.png", "img/a.png"], "question": "<image> vs <image>",
         "options": {"A": "same", "B": "different"}, "answer": "A"},
        {"id": "z", "image": "img/a.png", "question": "Colour?", "choices": ["green", "red"],
         "answer": 1}]
    out = tmp_path / "o.jsonl"
    assert convert_image_qa(_jsonl(tmp_path / "s.jsonl", rows), out, reward="exact").written == 3
    recs = load_records(out)
    assert recs[0].prompt.startswith("<image>\nColour?\n\nPlease reason") and recs[0].answer == "green"
    assert recs[0].reward == "exact" and recs[1].answer == "A" and len(recs[1].images) == 2
    assert recs[2].answer == "B" and recs[2].reward == "choice"
    bad = [{"id": 1, "question": "<image> <image>", "answer": "a", "image": "img/a.png"}]
    with pytest.raises(DataError, match=r"s2.jsonl:1: question has 2 <image> tag\(s\) but"):
        convert_image_qa(_jsonl(tmp_path / "s2.jsonl", bad), tmp_path / "o2.jsonl", strict=True)
    bad = [{"id": 1, "question": "q", "answer": "a", "image": "img/missing.png"}]
    with pytest.raises(DataError, match="image file not found"):
        convert_image_qa(_jsonl(tmp_path / "s3.jsonl", bad), tmp_path / "o3.jsonl", strict=True)
    bad = [{"id": 1, "question": "q", "answer": "a", "image": {"bytes": b"not an image"}}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "s4.parquet")
    with pytest.raises(DataError, match=r"s4.parquet.*row index 0.*not an image"):
        convert_image_qa(tmp_path / "s4.parquet", tmp_path / "o4.jsonl", strict=True)


def test_video_qa_frames_and_files(tmp_path):
    fake_mp4 = b"\x00\x00\x00\x18ftypmp42" + bytes(32)
    rows = [{"id": 1, "question": "Which way does it move?", "answer": "left",
             "frames": [_png((i * 50, 0, 0)) for i in range(3)]},
            {"id": 2, "question": "How many?", "answer": "3", "video": fake_mp4}]
    keys = sorted({k for r in rows for k in r})
    rows = [{k: r.get(k) for k in keys} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "vid.parquet")
    out = tmp_path / "vid.jsonl"
    assert convert_video_qa(tmp_path / "vid.parquet", out).written == 2
    recs = load_records(out)
    assert isinstance(recs[0].video, list) and len(recs[0].video) == 3
    assert recs[1].video.endswith(".mp4") and Path(recs[1].video).read_bytes() == fake_mp4
    assert recs[1].answer == "3" and {r.domain for r in recs} == {"video"}


def _energon_prepare(path: Path, sample_type: str, field_map: dict) -> None:
    cmd = [sys.executable, "-c", "from megatron.energon.cli.main import main; main()",
           "prepare", str(path), "--non-interactive", "--no-progress",
           "--split-parts", "train:data-{000000..000000}.tar", "--sample-type", sample_type,
           "--field-map", json.dumps(field_map)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_energon_vqa_and_multichoice(tmp_path):
    pytest.importorskip("megatron.energon")
    import webdataset as wds

    vqa, mc = tmp_path / "vqa", tmp_path / "mc"
    for d in (vqa, mc):
        d.mkdir()
    with wds.TarWriter(str(vqa / "data-000000.tar")) as w:
        for i in range(3):
            w.write({"__key__": f"s{i}", "png": _png((80 * i, 10, 10)),
                     "json": json.dumps({"q": f"What is shown {i}?", "a": [f"thing{i}"]})})
    _energon_prepare(vqa, "VQASample", {"image": "png", "context": "json[q]",
                                        "answers": "json[a]"})
    with wds.TarWriter(str(mc / "data-000000.tar")) as w:
        for i in range(2):
            w.write({"__key__": f"m{i}", "png": _png((10, 10, 80 * i)),
                     "json": json.dumps({"q": "Pick", "c": ["cat", "dog", "cow"], "k": i})})
    _energon_prepare(mc, "MultiChoiceVQASample", {"image": "png", "context": "json[q]",
                                                  "choices": "json[c]",
                                                  "correct_choice_idx": "json[k]"})
    out = tmp_path / "vqa.jsonl"
    assert convert_energon(vqa, out, domain="image").written == 3
    recs = load_records(out)
    assert [r.id for r in recs] == ["vqa-s0", "vqa-s1", "vqa-s2"]
    assert recs[1].answer == "thing1" and recs[1].prompt == "What is shown 1?"
    with Image.open(recs[2].images[0]) as img:
        assert img.size == (8, 6) and img.getpixel((0, 0)) == (160, 10, 10)
    assert convert_energon(mc, tmp_path / "mc.jsonl", limit=2).written == 2
    recs = load_records(tmp_path / "mc.jsonl")
    assert [r.answer for r in recs] == ["A", "B"] and recs[0].reward == "choice"
    assert "C. cow" in recs[0].prompt
    with pytest.raises(DataError, match="not an energon dataset"):
        convert_energon(tmp_path, tmp_path / "x.jsonl")


def test_prepare_data_cli(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", [{"problem": "1+1?", "answer": 2}])
    tool = str(ROOT / "tools" / "prepare_data.py")
    r = subprocess.run([sys.executable, tool, "math", str(src), "--output",
                        str(tmp_path / "o.jsonl")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "wrote 1 math records" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, tool, "image", str(src), "--output",
                        str(tmp_path / "o2.jsonl")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "without an image" in r.stderr
