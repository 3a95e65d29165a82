"""Shared pieces of the real-dataset converters: field lookup, choice formatting, a
content-addressed media store and an atomic, validating JSONL sink."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from megatron_copd.errors import DataError

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJ"  # what the 'choice' verifier reads


def pick(row: dict, names: Sequence[str], where: str, what: str, required: bool = True) -> Any:
    """The first of ``names`` present (not None) in ``row``."""
    for n in names:
        if row.get(n) is not None:
            return row[n]
    if required:
        raise DataError(f"{where}: no {what} field (expected one of {list(names)})")
    return None


def format_choices(question: str, choices: Sequence[Any], where: str) -> str:
    if not choices or len(choices) > len(LETTERS):
        raise DataError(f"{where}: field 'choices': expected 1..{len(LETTERS)} options, got "
                        f"{len(choices)}")
    lines = [f"{LETTERS[i]}. {str(c).strip()}" for i, c in enumerate(choices)]
    return f"{question.strip()}\n" + "\n".join(lines) + f"\n{CHOICE_INSTRUCTION}"


def choice_answer(answer: Any, choices: Sequence[Any], where: str) -> str:
    """The correct option's letter from an index, a letter, or the option's text."""
    if isinstance(answer, bool):
        raise DataError(f"{where}: field 'answer': expected an option index, letter or text")
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise DataError(f"{where}: field 'answer': index {answer} outside the "
                            f"{len(choices)} choices")
        return LETTERS[answer]
    text = str(answer).strip()
    if len(text) == 1 and text.upper() in LETTERS[: len(choices)]:
        return text.upper()
    for i, c in enumerate(choices):
        if str(c).strip() == text:
            return LETTERS[i]
    raise DataError(f"{where}: field 'answer': {text!r} is neither an option letter nor one of "
                    f"the choices")


class MediaStore:
    """Writes media bytes under ``root`` named by content hash (the same bytes once), each file
    atomically (temp name, then rename)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.written = 0

    def put(self, data: bytes, suffix: str) -> str:
        name = hashlib.sha256(data).hexdigest()[:24] + suffix
        path = self.root / name
        if not path.is_file():
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            self.written += 1
        return str(path)

    def put_image(self, value: Any, where: str, base_dir: Path) -> str:
        """A path (kept, resolved against ``base_dir``), raw bytes, an HF datasets image struct
        ``{"bytes": ..., "path": ...}`` or a PIL image -> a file path."""
        if isinstance(value, str):
            p = Path(value).expanduser()
            p = (p if p.is_absolute() else base_dir / p).resolve()
            if not p.is_file():
                raise DataError(f"{where}: image file not found: {p}")
            return str(p)
        if isinstance(value, dict):
            if value.get("bytes"):
                return self.put_image(bytes(value["bytes"]), where, base_dir)
            if value.get("path"):
                return self.put_image(value["path"], where, base_dir)
            raise DataError(f"{where}: image struct without bytes or path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            return self.put(data, _image_suffix(data, where))
        if hasattr(value, "save"):  # PIL image
            buf = io.BytesIO()
            value.save(buf, format="PNG")
            return self.put(buf.getvalue(), ".png")
        raise DataError(f"{where}: expected an image path, bytes or {{'bytes': ...}}, got "
                        f"{type(value).__name__}")


def _image_suffix(data: bytes, where: str) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "").lower()
    except (UnidentifiedImageError, OSError):
        raise DataError(f"{where}: embedded bytes are not an image Pillow can read") from None
    return {"jpeg": ".jpg"}.get(fmt, f".{fmt}" if fmt else ".img")


class RecordSink:
    """Collects prompt records and writes them as one JSONL file (temp name, then rename), then
    loads it back with :func:`megatron_copd.data.records.load_records` so every written row is
    known to validate."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.stem}.tmp.jsonl")
        self._f = open(self.tmp, "w", encoding="utf-8")
        self._ids: dict[str, str] = {}
        self.count = 0

    def add(self, record: dict, where: str) -> None:
        rid = record["id"]
        if rid in self._ids:
            raise DataError(f"{where}: duplicate id {rid!r} (first at {self._ids[rid]})")
        self._ids[rid] = where
        record = {k: v for k, v in record.items() if v is not None and v != [] and v != {}}
        if "images" in record:
            record["images"] = [self._relative(p) for p in record["images"]]
        if isinstance(record.get("video"), list):
            record["video"] = [self._relative(p) for p in record["video"]]
        elif isinstance(record.get("video"), str):
            record["video"] = self._relative(record["video"])
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def _relative(self, path: str) -> str:
        """Media inside the output's directory are stored relative to it (the folder can move;
        records resolve paths against the data file's directory)."""
        p, base = Path(path), self.path.parent.resolve()
        return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)

    def close(self) -> int:
        from megatron_copd.data.records import load_records

        self._f.close()
        try:
            load_records(self.tmp)
        except DataError as e:
            self.tmp.unlink(missing_ok=True)
            raise DataError(f"converted records do not validate: {e}") from None
        os.replace(self.tmp, self.path)
        return self.count

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "RecordSink":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is not None:
            self.abort()


def read_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """(where, row) of a JSONL or Parquet file; errors name file and line / row index."""
    from megatron_copd.data.records import _rows

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    yield from _rows(p, str(p))
