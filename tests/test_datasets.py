"""The paper's datasets in their published layouts, converted with the plain command: small files
written in each schema; the records have the right answers, options in the prompt exactly once,
the right verifier, media that load, and the project's verifier scores a right response 1 and a
wrong one 0. Each silent failure issue 27 reported has its case here."""

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

from megatron_copd.data.real import convert_image_qa, convert_math, convert_video_qa
from megatron_copd.data.records import load_records
from megatron_copd.errors import DataError
from megatron_copd.rewards import get_verifier

ROOT = Path(__file__).resolve().parents[1]
MP4 = b"\x00\x00\x00\x18ftypmp42" + bytes(32)


def _png(colour=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buf, "PNG")
    return buf.getvalue()


def _json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows))
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    keys = sorted({k for r in rows for k in r})
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    return path


def _right_and_wrong(rec, right: str, wrong: str) -> None:
    """The record's verifier gives 1 to ``right`` and 0 to ``wrong``."""
    verify = get_verifier(rec.reward)
    assert verify(right, rec.answer) == 1.0, (rec.reward, rec.answer, right)
    assert verify(wrong, rec.answer) == 0.0, (rec.reward, rec.answer, wrong)


def _options_once(prompt: str, options: list[str]) -> None:
    for letter, text in zip("ABCDEFGHIJ", options):
        assert prompt.count(f"{letter}. {text}") == 1, prompt
        assert f"{letter}. {letter}." not in prompt, prompt  # letters never doubled


def test_video_r1_json_array_with_answer_tags(tmp_path):
    """Video-R1-260k.json: a JSON array; image and video rows told apart by data_type; gold
    answers in <answer> tags; lettered options; media under 'path'."""
    (tmp_path / "Video-R1-data").mkdir()
    (tmp_path / "Video-R1-data" / "a.mp4").write_bytes(MP4)
    (tmp_path / "Video-R1-data" / "b.png").write_bytes(_png())
    rows = [
        {"problem_id": 1, "problem": "Where does the ball go?", "data_type": "video",
         "problem_type": "multiple choice", "options": ["A. left", "B. right"],
         "solution": "<answer>B</answer>", "path": "./Video-R1-data/a.mp4",
         "data_source": "LLaVA-Video-178K"},
        {"problem_id": 2, "problem": "How many balls are there?", "data_type": "video",
         "problem_type": "numerical", "options": [], "solution": "<answer>3</answer>",
         "path": "./Video-R1-data/a.mp4", "data_source": "STAR"},
        {"problem_id": 3, "problem": "What is written?", "data_type": "image",
         "problem_type": "OCR", "options": [], "solution": "<answer>STOP</answer>",
         "path": "./Video-R1-data/b.png", "data_source": "TextVQA"},
    ]
    src = _json(tmp_path / "Video-R1-260k.json", rows)
    out = tmp_path / "video.jsonl"
    report = convert_video_qa(src, out, where_filters={"data_type": "video"})
    assert report.written == 2 and report.verifiers == {"choice": 1, "math": 1}
    mc, num = load_records(out)
    assert mc.answer == "B" and mc.reward == "choice" and Path(mc.video).is_file()
    _options_once(mc.prompt, ["left", "right"])
    _right_and_wrong(mc, "<answer>B</answer>", "<answer>A</answer>")
    assert num.answer == "3" and "\\boxed" in num.prompt
    _right_and_wrong(num, "\\boxed{3}", "\\boxed{4}")
    img = tmp_path / "image.jsonl"
    assert convert_image_qa(src, img, where_filters={"data_type": "image"}).written == 1
    (ocr,) = load_records(img)
    assert ocr.answer == "STOP" and ocr.reward == "exact"
    _right_and_wrong(ocr, "\\boxed{stop}", "\\boxed{go}")


def test_onethinker_video_rows(tmp_path):
    """OneThinker's onethinker_rl_train.json: the same <answer>-wrapped layout."""
    (tmp_path / "v.mp4").write_bytes(MP4)
    rows = [{"id": "ot-1", "problem": "What happens next?", "problem_type": "multiple choice",
             "options": ["A. he sits", "B. he runs", "C. he jumps"],
             "solution": "<think>...</think><answer>C</answer>", "path": "v.mp4",
             "data_type": "video"}]
    out = tmp_path / "o.jsonl"
    convert_video_qa(_json(tmp_path / "onethinker_rl_train.json", rows), out)
    (rec,) = load_records(out)
    assert rec.answer == "C" and rec.reward == "choice"
    _options_once(rec.prompt, ["he sits", "he runs", "he jumps"])


def test_mvbench_candidates_with_a_text_answer(tmp_path):
    """MVBench's per-task json: 'candidates' and the answer as the candidate's text."""
    (tmp_path / "clip.mp4").write_bytes(MP4)
    rows = [{"video": "clip.mp4", "question": "What is the action?",
             "candidates": ["waving", "clapping", "jumping"], "answer": "clapping"}]
    out = tmp_path / "o.jsonl"
    convert_video_qa(_json(tmp_path / "action_sequence.json", rows), out)
    (rec,) = load_records(out)
    assert rec.answer == "B" and rec.reward == "choice"
    _options_once(rec.prompt, ["waving", "clapping", "jumping"])
    _right_and_wrong(rec, "The answer is (B).", "The answer is (C).")


def test_mmvu_and_video_holmes(tmp_path):
    """MMVU: choices as a mapping, a video given as a URL (refused with the row named, the
    rest converted). Video-Holmes: capitalised fields, Options as a mapping."""
    (tmp_path / "v.mp4").write_bytes(MP4)
    rows = [{"id": "m1", "video": "https://huggingface.co/x/v.mp4", "question": "Which?",
             "choices": {"A": "x", "B": "y"}, "answer": "A",
             "question_type": "multiple-choice"},
            {"id": "m2", "video": "v.mp4", "question": "Which?", "choices": {"A": "x", "B": "y",
             "C": None, "D": None}, "answer": "B", "question_type": "multiple-choice"}]
    out = tmp_path / "mmvu.jsonl"
    report = convert_video_qa(_json(tmp_path / "validation.json", rows), out)
    assert report.written == 1
    assert report.skips.lines() == [
        "skipped 1 row(s) with media given as a URL (nothing is downloaded): item 0"]
    (rec,) = load_records(out)
    assert rec.answer == "B" and "C. None" not in rec.prompt
    _options_once(rec.prompt, ["x", "y"])
    with pytest.raises(DataError, match=r"validation.json: item 0: field 'video': .* is a URL"):
        convert_video_qa(tmp_path / "validation.json", tmp_path / "s.jsonl", strict=True)
    holmes = [{"video ID": "v", "Question ID": "q1", "Question Type": "SR",
               "Question": "Why did he leave?", "Options": {"A": "late", "B": "angry"},
               "Answer": "B", "video_path": "v.mp4"}]
    out = tmp_path / "holmes.jsonl"
    convert_video_qa(_json(tmp_path / "test_Video-Holmes.json", holmes), out)
    (rec,) = load_records(out)
    assert rec.answer == "B" and rec.reward == "choice"
    _options_once(rec.prompt, ["late", "angry"])


def test_mathvista_and_mathvision_parquet(tmp_path):
    """MathVista: the image as bytes (decoded_image) wins over a path that exists only after
    unzipping; choices a list or null. MathVision: an empty options list = free-form."""
    red = _png()
    rows = [{"pid": "1", "question": "Which is larger?", "image": "images/1.jpg",
             "decoded_image": {"bytes": red, "path": None}, "choices": ["3", "5"],
             "answer": "5", "question_type": "multi_choice"},
            {"pid": "2", "question": "What is x?", "image": "images/2.jpg",
             "decoded_image": {"bytes": red, "path": None}, "choices": None, "answer": "12",
             "question_type": "free_form"}]
    out = tmp_path / "mv.jsonl"
    assert convert_image_qa(_parquet(tmp_path / "testmini.parquet", rows), out).written == 2
    mc, ff = load_records(out)
    assert mc.answer == "B" and mc.reward == "choice" and Image.open(mc.images[0]).size == (8, 6)
    _options_once(mc.prompt, ["3", "5"])
    assert ff.answer == "12" and ff.reward == "math"
    _right_and_wrong(ff, "so \\boxed{12}", "so \\boxed{13}")
    vision = [{"id": "7", "question": "Find the angle.", "options": [], "image": "images/7.jpg",
               "decoded_image": {"bytes": red, "path": None}, "answer": "30"},
              {"id": "8", "question": "Which figure?", "options": ["A", "B", "C", "D", "E"],
               "decoded_image": {"bytes": red, "path": None}, "answer": "D"}]
    out = tmp_path / "mvis.jsonl"
    convert_image_qa(_parquet(tmp_path / "test.parquet", vision), out)
    free, letters = load_records(out)
    assert free.reward == "math" and free.answer == "30"
    assert letters.reward == "choice" and letters.answer == "D"


def test_wemath_mathverse_mmmu(tmp_path):
    """We-Math: options as one string; MathVerse: choices written inside the question;
    MMMU: a Python-list string of options and images as image_1..image_7 bytes."""
    (tmp_path / "w.png").write_bytes(_png())
    wemath = [{"ID": "1", "question": "Find the angle.", "option": "A. 30°; B. 45°; C. 60°",
               "answer": "B", "image_path": "w.png"}]
    out = tmp_path / "we.jsonl"
    convert_image_qa(_json(tmp_path / "testmini.json", wemath), out)
    (rec,) = load_records(out)
    assert rec.answer == "B"
    _options_once(rec.prompt, ["30°", "45°", "60°"])
    verse = [{"sample_index": "4", "question": "What is x?\nChoices:\nA:2\nB:4",
              "image": "w.png", "answer": "B", "question_type": "multi-choice"}]
    out = tmp_path / "verse.jsonl"
    convert_image_qa(_json(tmp_path / "testmini_verse.json", verse), out)
    (rec,) = load_records(out)
    assert rec.reward == "choice" and rec.answer == "B"
    assert "Answer with the option's letter" in rec.prompt
    _right_and_wrong(rec, "B", "A")
    mmmu = [{"id": "validation_Art_1", "question": "<image 1> Which style?",
             "options": "['Baroque', 'Gothic', 'Modern']", "answer": "C",
             "image_1": {"bytes": _png((0, 0, 255)), "path": None}, "image_2": None,
             "question_type": "multiple-choice"}]
    out = tmp_path / "mmmu.jsonl"
    convert_image_qa(_parquet(tmp_path / "validation-00000.parquet", mmmu), out)
    (rec,) = load_records(out)
    assert rec.answer == "C" and len(rec.images) == 1 and rec.prompt.count("<image>") == 1
    _options_once(rec.prompt, ["Baroque", "Gothic", "Modern"])


def test_mmfinereason_lettered_options_repeated_ids_and_bad_rows(tmp_path):
    """Options that already carry letters are not lettered again; ids repeated across the
    set's sources are made unique; a row without an answer is skipped and counted, not fatal."""
    (tmp_path / "a.png").write_bytes(_png())
    rows = [{"id": 5, "question": "Pick one.", "options": ["A. a cat", "B. a dog"],
             "answer": "A", "image": "a.png", "source": "geo"},
            {"id": 5, "question": "How many?", "answer": "4", "image": "a.png",
             "source": "chart"},
            {"id": 6, "question": "Empty?", "answer": "", "image": "a.png", "source": "chart"}]
    out = tmp_path / "mmf.jsonl"
    report = convert_image_qa(_json(tmp_path / "MMFineReason.json", rows), out)
    assert report.written == 2 and report.renamed == 1
    assert report.skips.lines() == ["skipped 1 row(s) without an answer: item 2"]
    a, b = load_records(out)
    assert a.id != b.id and a.answer == "A" and b.answer == "4"
    _options_once(a.prompt, ["a cat", "a dog"])


def test_mmfinereason_sft_123k_parquet(tmp_path):
    """MMFineReason-SFT-123K as published (its parquet columns: question with <image>,
    original_answer, image as {bytes, path}, source, pass_rate, is_consistent, the teacher's
    thinking response; no id column): the gold answer is original_answer's last <answer>
    block, the <think> trace dropped; rows whose answer is untagged prose are skipped and
    counted, not written with a reward that can never be 1."""
    png = {"bytes": _png(), "path": None}
    rows = [{"question": "<image>What is the area?", "source": "MMR1", "pass_rate": 0.25,
             "original_answer": "<think>3 by 3 so x = 9.</think>\n<answer>9</answer>",
             "image": png, "is_consistent": True, "qwen3vl_235b_thinking_response": "..."},
            {"question": "<image>Which shape is shaded?\nA. circle\nB. square", "pass_rate": 0.5,
             "original_answer": "<think>t</think><answer>B</answer>", "image": png,
             "source": "GameQA-140K", "is_consistent": True,
             "qwen3vl_235b_thinking_response": "..."},
            {"question": "<image>Find the area.", "source": "BMMR", "pass_rate": 0.75,
             "original_answer": "The perimeter is 48, so each side is 11.15 and therefore the "
                                "area of the square is about 124.3 square units.",
             "image": png, "is_consistent": False, "qwen3vl_235b_thinking_response": "..."}]
    out = tmp_path / "mmfr.jsonl"
    report = convert_image_qa(_parquet(tmp_path / "train-00000-of-00003.parquet", rows), out)
    assert report.written == 2
    assert report.skips.lines() == [
        "skipped 1 row(s) whose answer is prose, not a short answer a verifier can check: row index 2"]
    area, shape = load_records(out)
    assert area.answer == "9" and area.reward == "math" and len(area.images) == 1
    assert area.prompt.count("<image>") == 1 and "<think>" not in area.prompt
    _right_and_wrong(area, "<answer>\\boxed{9}</answer>", "\\boxed{8}")
    assert Image.open(tmp_path / area.images[0]).size == (8, 6)
    assert shape.answer == "B" and shape.reward == "choice"  # options inside the question
    _right_and_wrong(shape, "B", "A")


def test_videochat_r1_task_files(tmp_path):
    """VideoChat-R1's task files (JSON arrays; video relative to the task's visual base):
    multiple-choice rows with a span 'glue' become choice records; tracking rows (no question,
    boxes) and temporal-grounding rows (a [start, end] answer scored by IoU) are skipped and
    counted instead of getting a verifier that reads one number of the span."""
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "v1.mp4").write_bytes(MP4)
    rows = [{"video": "clips/v1.mp4", "question": "What happens first?",
             "options": ["A. he sits", "B. he runs"], "answer": "B", "glue": [1.5, 4.0]},
            {"video": "clips/v1.mp4", "question": "When does he run?", "answer": [1.5, 4.0],
             "duration": 12.0},
            {"path": "GOT-10k/train/GOT-10k_Train_008002", "object": "wheel",
             "gt": [[0.58, 0.5, 0.64, 0.6]]}]
    out = tmp_path / "vc.jsonl"
    report = convert_video_qa(_json(tmp_path / "mc_train.json", rows), out)
    assert report.written == 1
    assert sorted(report.skips.lines()) == [
        "skipped 1 row(s) whose answer is a time span or box (IoU tasks: no verifier here): "
        "item 1",
        "skipped 1 row(s) without a question: item 2"]
    (rec,) = load_records(out)
    assert rec.answer == "B" and rec.reward == "choice" and rec.video.endswith("v1.mp4")
    _options_once(rec.prompt, ["he sits", "he runs"])
    _right_and_wrong(rec, "B", "A")


def test_text_evals_capitalised_and_boxed(tmp_path):
    """AIME 2024 copy with Problem / Answer; MATH-500 with a boxed solution; HMMT; Minerva."""
    aime = [{"ID": "2024-I-1", "Problem": "Find n.", "Answer": 204, "Solution": "..."}]
    out = tmp_path / "aime.jsonl"
    convert_math(_json(tmp_path / "aime_2024.json", aime), out)
    (rec,) = load_records(out)
    assert rec.answer == "204" and rec.prompt.startswith("Find n.") and rec.id.endswith("2024-I-1")
    _right_and_wrong(rec, "\\boxed{204}", "\\boxed{205}")
    m500 = [{"problem": "Compute 1/2 + 1/2.", "solution": "so \\boxed{1}", "answer": "1",
             "unique_id": "test/x/1.json"},
            {"problem": "Half of 3?", "answer": "\\boxed{\\frac{3}{2}}", "unique_id": "t2"}]
    out = tmp_path / "m500.jsonl"
    convert_math(_json(tmp_path / "test.json", m500), out)
    one, half = load_records(out)
    assert one.answer == "1" and half.answer == "\\frac{3}{2}"
    _right_and_wrong(half, "\\boxed{1.5}", "\\boxed{2}")
    # HMMT February 2025 (MathArena parquet: problem_idx, problem, answer, problem_type)
    hmmt = [{"problem_idx": 3, "problem": "Compute the sum.", "answer": "\\frac{9}{4}",
             "problem_type": ["Algebra"]}]
    out = tmp_path / "hmmt.jsonl"
    convert_math(_parquet(tmp_path / "hmmt_feb_2025.parquet", hmmt), out)
    (rec,) = load_records(out)
    assert rec.answer == "\\frac{9}{4}" and rec.reward == "math"
    _right_and_wrong(rec, "\\boxed{2.25}", "\\boxed{\\frac{9}{5}}")
    # Minerva Math (question, answer)
    minerva = [{"question": "Find the speed in m/s.", "answer": "7.5"}]
    out = tmp_path / "minerva.jsonl"
    convert_math(_json(tmp_path / "minervamath.json", minerva), out)
    (rec,) = load_records(out)
    assert rec.answer == "7.5" and rec.prompt.startswith("Find the speed")
    _right_and_wrong(rec, "\\boxed{7.5}", "\\boxed{7.6}")


def test_prepare_data_cli_flags_summary_and_strict(tmp_path):
    """Field overrides, --where, the one-line-per-reason summary, --strict; a file that yields
    no record is an error."""
    (tmp_path / "a.png").write_bytes(_png())
    rows = [{"q": "Colour?", "gold": "red", "pic": "a.png", "split": "x"},
            {"q": "Colour?", "gold": "", "pic": "a.png", "split": "x"},
            {"q": "Shape?", "gold": "square", "pic": "a.png", "split": "y"}]
    src = _json(tmp_path / "custom.json", rows)
    tool = [sys.executable, str(ROOT / "tools" / "prepare_data.py"), "image", str(src)]
    flags = ["--question-field", "q", "--answer-field", "gold", "--image-field", "pic",
             "--where", "split=x"]
    r = subprocess.run([*tool, "--output", str(tmp_path / "o.jsonl"), *flags],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"wrote 1 image records to {tmp_path / 'o.jsonl'} (verifiers: exact 1)",
        "skipped 1 row(s) without an answer: item 1"]
    r = subprocess.run([*tool, "--output", str(tmp_path / "s.jsonl"), *flags, "--strict"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "custom.json: item 1: field 'answer': empty" in r.stderr
    assert not (tmp_path / "s.jsonl").exists()
    r = subprocess.run([*tool, "--output", str(tmp_path / "n.jsonl")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no records" in r.stderr and r.stderr.count("\n") == 1


def test_converted_image_and_video_records_train(tmp_path):
    """Convert then train: a MathVista-style Parquet (image bytes, choices) and a video set with
    frames, through prepare_data, then a 2-step `copd train` with data.world: files on them
    (the tiny Qwen3-VL, 2 processes)."""
    import yaml

    from megatron_copd.data.toy.vocab import build_toy_tokenizer, tokenizer_dir_name
    from megatron_copd.data.toy.world import build_toy_world

    world = build_toy_world(tmp_path / "cache", seed=1, train_size=20, eval_size=5)
    build_toy_tokenizer(world, 512, qwen_vl=True)
    tok = world.root / tokenizer_dir_name(512, qwen_vl=True)
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    images = [{"pid": str(i), "question": "Which colour?", "choices": ["red", "blue", "green"],
               "answer": ["red", "blue", "green"][i % 3],
               "decoded_image": {"bytes": _png32(colours[i % 3]), "path": None}}
              for i in range(6)]
    videos = [{"id": i, "question": "What colour is the video?", "answer": "red",
               "frames": [_png32(colours[0]) for _ in range(4)]} for i in range(6)]
    tool = [sys.executable, str(ROOT / "tools" / "prepare_data.py")]
    for kind, src in (("image", _parquet(tmp_path / "img.parquet", images)),
                      ("video", _parquet(tmp_path / "vid.parquet", videos))):
        r = subprocess.run([*tool, kind, str(src), "--output", str(tmp_path / f"{kind}.jsonl")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    cfg = {"run_dir": str(tmp_path / "run"), "seed": 3,
           "model": {"hidden_size": 64, "num_layers": 2, "ffn_hidden_size": 128,
                     "max_sequence_length": 192,
                     "qwen_vl": {"depth": 1, "hidden_size": 32, "num_heads": 2,
                                 "intermediate_size": 64, "deepstack_visual_indexes": [0],
                                 "mrope_section": [2, 3, 3], "patch_size": 8,
                                 "num_position_embeddings": 16, "vision_start_token_id": 5,
                                 "vision_end_token_id": 6, "image_token_id": 7,
                                 "video_token_id": 8, "min_pixels": 1024, "max_pixels": 4096,
                                 "max_frames": 4}},
           "branches": [{"name": k, "domains": [k], "train_data": [str(tmp_path / f"{k}.jsonl")],
                         "eval_data": [str(tmp_path / f"{k}.jsonl")]} for k in ("image", "video")],
           "schedule": {"cycles": 1, "s_rl": 1, "s_opd": 1},
           "grpo": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4,
                    "micro_batch_size": 4, "reward_workers": 0},
           "opd": {"prompts_per_step": 2}, "data": {"world": "files", "tokenizer": str(tok)},
           "eval": {"max_items": 4, "batch_size": 4}, "logging": {"progress": False}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "megatron_copd.cli", "train", str(path)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["merged"]) == {"image", "video"}


def _png32(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, "PNG")
    return buf.getvalue()
