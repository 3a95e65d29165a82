"""Image and video question-answer sets (JSONL / Parquet) -> prompt records.

Rows may carry their media as paths (relative to the data file), raw bytes, or the Hugging Face
datasets image struct ``{"bytes": ..., "path": ...}`` that Parquet exports hold; embedded media
are written once each (content-hashed) under ``media_dir`` and the records point at the files.

Recognised fields (first present wins):

- question: ``question``, ``query``, ``prompt``, ``problem``, ``context``, or LLaVA-style
  ``conversations`` (first human turn = prompt, first gpt turn = answer);
- answer: ``answer``, ``answers`` (a list: the most frequent, ties by first), ``label``,
  ``gt_answer``;
- choices: ``choices`` / ``options`` (a list, or a mapping letter -> text): the prompt lists
  them as ``A. ...`` and the answer becomes the letter (verifier ``choice``);
- images: ``images`` (list), ``image``, ``image_path`` — ``<image>`` tags in the question mark
  where each goes (otherwise images come first, see ``data.prompting``);
- video: ``video`` / ``video_path`` (a file or its bytes) or ``frames`` (frame files or bytes).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from megatron_copd.data.real.common import (
    MediaStore,
    RecordSink,
    choice_answer,
    format_choices,
    pick,
    read_rows,
)
from megatron_copd.errors import DataError

QUESTION_FIELDS = ("question", "query", "prompt", "problem", "context")
ANSWER_FIELDS = ("answer", "answers", "label", "gt_answer")
ID_FIELDS = ("id", "question_id", "qid", "idx", "uid", "__key__")
IMAGE_TAG, VIDEO_TAG = "<image>", "<video>"


def qa_fields(row: dict, where: str, reward: str | None) -> tuple[str, str, str | None]:
    """(prompt, answer, reward) of a QA row."""
    if isinstance(row.get("conversations"), list):
        turns = row["conversations"]
        human = [t.get("value") for t in turns if t.get("from") in ("human", "user")]
        gpt = [t.get("value") for t in turns if t.get("from") in ("gpt", "assistant")]
        if not human or not gpt:
            raise DataError(f"{where}: field 'conversations': expected a human and a gpt turn")
        question, answer = human[0], gpt[0]
    else:
        question = pick(row, QUESTION_FIELDS, where, "question")
        answer = pick(row, ANSWER_FIELDS, where, "answer")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field 'question': expected non-empty text")
    if isinstance(answer, list):
        texts = [a.get("answer") if isinstance(a, dict) else a for a in answer]
        texts = [str(t).strip() for t in texts if t is not None and str(t).strip()]
        if not texts:
            raise DataError(f"{where}: field 'answers': no non-empty answer")
        counts = Counter(texts)
        answer = max(texts, key=lambda t: (counts[t], -texts.index(t)))
    choices = pick(row, ("choices", "options"), where, "choices", required=False)
    if choices is not None:
        if isinstance(choices, dict):
            choices = [choices[k] for k in sorted(choices)]
        if not isinstance(choices, (list, tuple)):
            raise DataError(f"{where}: field 'choices': expected a list of options")
        return (format_choices(question, list(choices), where),
                choice_answer(answer, list(choices), where), "choice")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: field 'answer': expected text or a number")
    answer = str(answer).strip()
    if not answer:
        raise DataError(f"{where}: field 'answer': empty")
    return question.strip(), answer, reward


def _as_list(v: Any) -> list:
    if v is None:
        return []
    if hasattr(v, "tolist") and not isinstance(v, (bytes, bytearray)):
        v = v.tolist()
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _row_id(row: dict, where: str, prefix: str, index: int) -> str:
    rid = pick(row, ID_FIELDS, where, "id", required=False)
    return f"{prefix}-{rid if rid is not None else index}"


def _convert(src, output, media_dir, domain, reward, id_prefix, limit, media) -> int:
    """The loop both converters share; ``media(row, where, prompt, store, base)`` returns the
    record's media fields (``images`` or ``video``) after checking them against the prompt."""
    src, output = Path(src), Path(output)
    store = MediaStore(media_dir or output.parent / f"{output.stem}_media")
    base = src.resolve().parent
    with RecordSink(output) as sink:
        for i, (where, row) in enumerate(read_rows(src)):
            if limit is not None and i >= limit:
                break
            prompt, answer, rew = qa_fields(row, where, reward)
            fields = media(row, where, prompt, store, base)
            sink.add({"id": _row_id(row, where, id_prefix or src.stem, i), "domain": domain,
                      "prompt": prompt, "answer": answer, **fields, "reward": rew,
                      "meta": {"source": src.name}}, where)
        return sink.close()


def _image_fields(row: dict, where: str, prompt: str, store: MediaStore, base: Path) -> dict:
    raw = _as_list(row["images"]) if row.get("images") is not None else _as_list(
        pick(row, ("image", "image_path"), where, "image"))
    images = [store.put_image(v, f"{where}: images[{j}]", base) for j, v in enumerate(raw)]
    if not images:
        raise DataError(f"{where}: no image")
    tags = prompt.count(IMAGE_TAG)
    if tags and tags != len(images):
        raise DataError(f"{where}: question has {tags} {IMAGE_TAG} tag(s) but the row has "
                        f"{len(images)} image(s)")
    return {"images": images}


def _video_fields(row: dict, where: str, prompt: str, store: MediaStore, base: Path) -> dict:
    if row.get("frames") is not None:
        frames = _as_list(row["frames"])
        if not frames:
            raise DataError(f"{where}: field 'frames': empty")
        video: Any = [store.put_image(v, f"{where}: frames[{j}]", base)
                      for j, v in enumerate(frames)]
    else:
        video = _video_file(store, pick(row, ("video", "video_path"), where, "video"), where, base)
    if prompt.count(IMAGE_TAG):
        raise DataError(f"{where}: question has {IMAGE_TAG} tags but the row is a video")
    return {"video": video}


def convert_image_qa(
    src: str | os.PathLike,
    output: str | os.PathLike,
    media_dir: str | os.PathLike | None = None,
    *,
    domain: str = "image",
    reward: str | None = None,
    id_prefix: str | None = None,
    limit: int | None = None,
) -> int:
    """Image QA rows -> prompt-record JSONL (embedded images extracted); returns the count."""
    return _convert(src, output, media_dir, domain, reward, id_prefix, limit, _image_fields)


def convert_video_qa(
    src: str | os.PathLike,
    output: str | os.PathLike,
    media_dir: str | os.PathLike | None = None,
    *,
    domain: str = "video",
    reward: str | None = None,
    id_prefix: str | None = None,
    limit: int | None = None,
) -> int:
    """Video QA rows -> prompt-record JSONL (embedded videos / frames extracted)."""
    return _convert(src, output, media_dir, domain, reward, id_prefix, limit, _video_fields)


def _video_file(store: MediaStore, value: Any, where: str, base: Path) -> str:
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        p = Path(value).expanduser()
        p = (p if p.is_absolute() else base / p).resolve()
        if not p.is_file():
            raise DataError(f"{where}: video file not found: {p}")
        return str(p)
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
        return store.put(bytes(value), _video_suffix(bytes(value)))
    raise DataError(f"{where}: field 'video': expected a file path or the file's bytes")


def _video_suffix(data: bytes) -> str:
    # Containers by signature; PyAV probes the content anyway, the name is for humans.
    if data[4:8] == b"ftyp":
        return ".mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return ".webm"
    if data[:4] == b"RIFF":
        return ".avi"
    return ".video"
