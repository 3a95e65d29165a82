"""Image and video question-answer sets (JSONL / JSON arrays / Parquet) -> prompt records.

Rows may carry their media as paths (relative to the data file, or to ``media_root``), raw
bytes, or the Hugging Face datasets image struct ``{"bytes": ..., "path": ...}``; embedded
media are written once each (content-hashed) under ``media_dir`` and the records point at the
files. Bytes win over a path in the same row (MathVista's ``decoded_image`` over ``image``,
whose path exists only after unzipping an archive). URLs are refused (nothing is downloaded).

Recognised fields (first present wins, keys matched regardless of case; ``fields`` overrides):

- question: ``question``, ``query``, ``prompt``, ``problem``, ``context``, or LLaVA-style
  ``conversations`` (first human turn = prompt, first gpt turn = answer);
- answer: ``answer``, ``solution`` (``<answer>..</answer>`` unwrapped), ``answers`` (a list:
  the most frequent, ties by first), ``label``, ``gt_answer``;
- options: ``options``, ``choices``, ``candidates``, ``option`` in any published form (see
  :mod:`normalize`): the prompt lists them once as ``A. ...`` and the answer becomes the
  letter (verifier ``choice``). A row that declares multiple choice (``question_type`` /
  ``problem_type`` containing "choice") with a letter answer and the options inside the
  question (MathVerse) is multiple choice too;
- images: ``images``, ``decoded_image``, ``image``, ``image_path``, ``image_1`` ..
  ``image_7`` (MMMU; ``<image N>`` tags become ``<image>``);
- video: ``video``, ``videos``, ``video_path``, ``path`` (a file or its bytes) or ``frames``.

Free-form answers get the verifier ``math`` (numbers, expressions) or ``exact`` (words) unless
``reward`` names one, and the prompt the instruction to put the answer in ``\\boxed{}``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from megatron_copd.data.real.common import (
    CHOICE_INSTRUCTION,
    LETTERS,
    MATH_INSTRUCTION,
    ConvertReport,
    MediaStore,
    RecordSink,
    RowSkip,
    Skips,
    free_form_verifier,
    pick,
    read_rows,
)
from megatron_copd.data.real.normalize import (
    clean_answer,
    letter_only,
    normalize_options,
    option_letter,
)
from megatron_copd.errors import DataError

QUESTION_FIELDS = ("question", "query", "prompt", "problem", "context")
# original_answer: MMFineReason (its teacher's "<think>...</think><answer>...</answer>")
ANSWER_FIELDS = ("answer", "solution", "answers", "label", "gt_answer", "original_answer")
# A free-form gold answer longer than this is prose (a worked solution), which no verifier of
# the project can match a response against: the row is skipped and counted.
MAX_ANSWER_WORDS = 12
OPTION_FIELDS = ("options", "choices", "candidates", "option")
ID_FIELDS = ("id", "question_id", "qid", "idx", "uid", "problem_id", "sample_index", "__key__")
TYPE_FIELDS = ("question_type", "problem_type", "type")
IMAGE_FIELDS = ("images", "decoded_image", "image", "image_path", "path")
VIDEO_FIELDS = ("video", "videos", "video_path", "path")
IMAGE_TAG, VIDEO_TAG = "<image>", "<video>"
_NUMBERED_TAG = re.compile(r"<image[ _]?(\d+)>")
_OPTION_LINE = re.compile(r"(?m)^\s*\(?[A-J][\).:]\s")


def qa_fields(row: dict, where: str, reward: str | None, fields: dict[str, str] | None = None
              ) -> tuple[str, str, str]:
    """(prompt, answer, verifier) of a QA row; RowSkip when it cannot be one."""
    fields = fields or {}

    def names(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        return (fields[key],) if key in fields else default

    if "question" not in fields and isinstance(row.get("conversations"), list):
        question, answer = _conversation(row["conversations"], where)
    else:
        question = pick(row, names("question", QUESTION_FIELDS), where, "a question")
        answer = pick(row, names("answer", ANSWER_FIELDS), where, "an answer")
    if not isinstance(question, str) or not question.strip():
        raise RowSkip(where, "without a question", "field 'question': expected non-empty text")
    question = _NUMBERED_TAG.sub(IMAGE_TAG, question.strip())
    answer = _one_answer(answer, where)
    options = normalize_options(
        pick(row, names("options", OPTION_FIELDS), where, "options", required=False), where)
    if options is not None:
        try:
            letter = option_letter(answer, options, where)
        except DataError as e:
            raise RowSkip(where, "with an answer that is none of the options", str(e)) from None
        lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
        return f"{question}\n{lines}\n{CHOICE_INSTRUCTION}", letter, "choice"
    kind = str(pick(row, TYPE_FIELDS, where, "type", required=False) or "").lower()
    inline = len(_OPTION_LINE.findall(question)) >= 2  # lettered lines inside the question
    if ("choice" in kind or inline) and letter_only(answer):  # options written in the question
        return f"{question}\n{CHOICE_INSTRUCTION}", letter_only(answer), "choice"
    text = clean_answer(answer)
    if not text:
        raise RowSkip(where, "without an answer", "field 'answer': empty")
    if len(text.split()) > MAX_ANSWER_WORDS:  # a worked solution: its last \boxed{}, if any
        from megatron_copd.rewards.builtin import last_boxed

        boxed = last_boxed(text)
        if boxed is None or not boxed.strip():
            raise RowSkip(where, "whose answer is prose, not a short answer a verifier can "
                          "check", f"field 'answer': {len(text.split())} words (more than "
                          f"{MAX_ANSWER_WORDS}, no <answer> tag or \\boxed{{}})")
        text = boxed.strip()
    verifier = reward or free_form_verifier(text)
    prompt = question if "boxed" in question else f"{question}\n\n{MATH_INSTRUCTION}"
    return prompt, text, verifier


def _conversation(turns: list, where: str) -> tuple[str, str]:
    human = [t.get("value") for t in turns if t.get("from") in ("human", "user")]
    gpt = [t.get("value") for t in turns if t.get("from") in ("gpt", "assistant")]
    if not human or not gpt:
        raise RowSkip(where, "without a question and an answer",
                      "field 'conversations': expected a human and a gpt turn")
    return human[0], gpt[0]


def _one_answer(answer: Any, where: str) -> Any:
    if hasattr(answer, "tolist") and not isinstance(answer, (str, bytes)):
        answer = answer.tolist()
    if (isinstance(answer, list) and answer
            and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in answer)):
        # VideoChat-R1's temporal grounding / detection rows: a span or box scored by IoU
        raise RowSkip(where, "whose answer is a time span or box (IoU tasks: no verifier here)",
                      f"field 'answer': a list of {len(answer)} numbers")
    if isinstance(answer, list):
        texts = [a.get("answer") if isinstance(a, dict) else a for a in answer]
        texts = [str(t).strip() for t in texts if t is not None and str(t).strip()]
        if not texts:
            raise RowSkip(where, "without an answer", "field 'answers': no non-empty answer")
        counts = Counter(texts)
        return max(texts, key=lambda t: (counts[t], -texts.index(t)))
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise RowSkip(where, "without an answer", "field 'answer': expected text or a number")
    return answer


def _as_list(v: Any) -> list:
    if v is None:
        return []
    if hasattr(v, "tolist") and not isinstance(v, (bytes, bytearray)):
        v = v.tolist()
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _matches(row: dict, where_filters: dict[str, str]) -> bool:
    return all(str(pick(row, (k,), "", k, required=False)) == v
               for k, v in where_filters.items())


def _convert(src, output, media_dir, domain, reward, id_prefix, limit, media, *,
             fields=None, media_root=None, where_filters=None, strict=False) -> ConvertReport:
    """The loop both converters share; ``media(row, where, prompt, store, base, fields)``
    returns the record's media fields (``images`` or ``video``)."""
    src, output = Path(src), Path(output)
    store = MediaStore(media_dir or output.parent / f"{output.stem}_media")
    base = Path(media_root).resolve() if media_root else src.resolve().parent
    skips, verifiers = Skips(strict), Counter()
    id_names = (fields["id"],) if fields and "id" in fields else ID_FIELDS
    with RecordSink(output) as sink:
        for i, (where, row) in enumerate(read_rows(src)):
            if limit is not None and sink.count >= limit:
                break
            if where_filters and not _matches(row, where_filters):
                continue
            try:
                prompt, answer, verifier = qa_fields(row, where, reward, fields)
                found = media(row, where, prompt, store, base, fields or {})
            except RowSkip as skip:
                skips.add(skip)
                continue
            rid = pick(row, id_names, where, "id", required=False)
            source = pick(row, ("data_source", "source"), where, "source", required=False)
            meta = {"source": src.name, **({"data_source": source} if source else {})}
            sink.add({"id": f"{id_prefix or src.stem}-{rid if rid is not None else i}",
                      "domain": domain, "prompt": prompt, "answer": answer, **found,
                      "reward": verifier, "meta": meta}, where)
            verifiers[verifier] += 1
        if sink.count == 0:
            raise DataError(f"{src}: no records ({skips.count} row(s) skipped: "
                            f"{'; '.join(skips.lines()) or 'none matched'})")
        renamed = sink.renamed
        return ConvertReport(sink.close(), dict(verifiers), skips, renamed)


def _image_fields(row: dict, where: str, prompt: str, store: MediaStore, base: Path,
                  fields: dict) -> dict:
    numbered = [row[k] for k in sorted(row, key=str) if re.fullmatch(r"image_\d+", str(k))
                and row[k] is not None]
    names = (fields["image"],) if "image" in fields else IMAGE_FIELDS
    raw = numbered or _as_list(pick(row, names, where, "an image"))
    raw = [_bytes_first(v) for v in raw]
    if not raw:
        raise RowSkip(where, "without an image", "no image")
    images = [_store_image(store, v, where, f"images[{j}]", base) for j, v in enumerate(raw)]
    tags = prompt.count(IMAGE_TAG)
    if tags and tags != len(images):
        raise RowSkip(where, "whose <image> tags do not match the images",
                      f"question has {tags} {IMAGE_TAG} tag(s) but the row has "
                      f"{len(images)} image(s)")
    return {"images": images}


def _bytes_first(v: Any) -> Any:
    if isinstance(v, dict) and v.get("bytes"):
        return {"bytes": v["bytes"]}
    return v


def _store_image(store: MediaStore, value: Any, where: str, label: str, base: Path) -> str:
    _refuse_url(value, where, label)
    try:
        return store.put_image(value, f"{where}: {label}", base)
    except DataError as e:
        raise RowSkip(where, "with an image that cannot be read",
                      str(e).removeprefix(f"{where}: ")) from None


def _refuse_url(value: Any, where: str, label: str) -> None:
    if isinstance(value, str) and re.match(r"^[a-z][a-z0-9+.-]*://", value, re.I):
        raise RowSkip(where, "with media given as a URL (nothing is downloaded)",
                      f"field '{label}': {value!r} is a URL; download the media and point at "
                      "the files")


def _video_fields(row: dict, where: str, prompt: str, store: MediaStore, base: Path,
                  fields: dict) -> dict:
    if row.get("frames") is not None:
        frames = _as_list(row["frames"])
        if not frames:
            raise RowSkip(where, "without a video", "field 'frames': empty")
        video: Any = [_store_image(store, v, where, f"frames[{j}]", base)
                      for j, v in enumerate(frames)]
    else:
        names = (fields["video"],) if "video" in fields else VIDEO_FIELDS
        value = pick(row, names, where, "a video")
        if isinstance(value, list):
            if len(value) != 1:
                raise RowSkip(where, "with several videos", f"{len(value)} videos in one row")
            value = value[0]
        _refuse_url(value, where, "video")
        video = _video_file(store, value, where, base)
    if prompt.count(IMAGE_TAG):
        raise RowSkip(where, "with <image> tags in a video question",
                      f"question has {IMAGE_TAG} tags but the row is a video")
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
    **options: Any,
) -> ConvertReport:
    """Image QA rows -> prompt-record JSONL (embedded images extracted). ``options``:
    ``fields`` (role -> column), ``media_root``, ``where_filters`` (column -> value),
    ``strict`` (refuse the first bad row instead of skipping it)."""
    return _convert(src, output, media_dir, domain, reward, id_prefix, limit, _image_fields,
                    **options)


def convert_video_qa(
    src: str | os.PathLike,
    output: str | os.PathLike,
    media_dir: str | os.PathLike | None = None,
    *,
    domain: str = "video",
    reward: str | None = None,
    id_prefix: str | None = None,
    limit: int | None = None,
    **options: Any,
) -> ConvertReport:
    """Video QA rows -> prompt-record JSONL (embedded videos / frames extracted)."""
    return _convert(src, output, media_dir, domain, reward, id_prefix, limit, _video_fields,
                    **options)


def _video_file(store: MediaStore, value: Any, where: str, base: Path) -> str:
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        p = Path(value).expanduser()
        p = (p if p.is_absolute() else base / p).resolve()
        if not p.is_file():
            raise RowSkip(where, "whose video file is missing", f"video file not found: {p}")
        return str(p)
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
        return store.put(bytes(value), _video_suffix(bytes(value)))
    raise RowSkip(where, "without a video", "field 'video': expected a file path or the file's "
                  "bytes")


def _video_suffix(data: bytes) -> str:
    # Containers by signature; PyAV probes the content anyway, the name is for humans.
    if data[4:8] == b"ftyp":
        return ".mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return ".webm"
    if data[:4] == b"RIFF":
        return ".avi"
    return ".video"
