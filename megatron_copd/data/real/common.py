"""Shared pieces of the real-dataset converters: field lookup, choice formatting, a
content-addressed media store and an atomic, validating JSONL sink."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from megatron_copd.errors import DataError

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJ"  # what the 'choice' verifier reads


class RowSkip(DataError):
    """A row that cannot become a record; ``reason`` groups it in the converter's summary
    ("without an answer"). Skipped and counted by default, an error with ``strict``."""

    def __init__(self, where: str, reason: str, detail: str = "") -> None:
        super().__init__(f"{where}: {detail or reason}")
        self.where, self.reason = where, reason


def pick(row: dict, names: Sequence[str], where: str, what: str, required: bool = True) -> Any:
    """The first of ``names`` present (not None) in ``row``; a name also matches a key that
    differs only in case (``Problem`` / ``problem``)."""
    lower = {str(k).lower(): k for k in row}
    for n in names:
        key = n if n in row else lower.get(n.lower())
        if key is not None and row.get(key) is not None:
            return row[key]
    if required:
        raise RowSkip(where, f"without {what}",
                      f"no field for {what} (expected one of {list(names)})")
    return None


def free_form_verifier(answer: str) -> str:
    """``math`` for numbers and expressions, ``exact`` for words (math-verify would read "red"
    as the product of three symbols)."""
    import re

    return "math" if re.search(r"[\d\\^=+*/π√]", answer) else "exact"


def format_choices(question: str, choices: Sequence[Any], where: str) -> str:
    if not choices or len(choices) > len(LETTERS):
        raise DataError(f"{where}: field 'choices': expected 1..{len(LETTERS)} options, got "
                        f"{len(choices)}")
    lines = [f"{LETTERS[i]}. {str(c).strip()}" for i, c in enumerate(choices)]
    return f"{question.strip()}\n" + "\n".join(lines) + f"\n{CHOICE_INSTRUCTION}"


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
        self.renamed = 0

    def add(self, record: dict, where: str) -> None:
        """Write one record; an id seen before (sets repeat ids across their sources) gets a
        suffix (``-2``, ``-3``, ...) and is counted in ``renamed``."""
        rid, n = record["id"], 1
        while record["id"] in self._ids:
            n += 1
            record["id"] = f"{rid}-{n}"
        self.renamed += n > 1
        self._ids[record["id"]] = where
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
    """(where, row) of a JSONL, JSON (an array of objects, or an object holding one) or Parquet
    file; errors name file and line / row index / item."""
    from megatron_copd.data.records import _rows

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    if p.suffix.lower() != ".json":
        yield from _rows(p, str(p))
        return
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{p}: not a readable JSON file ({e})") from None
    if isinstance(data, dict):  # {"data": [...]} and similar wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{p}: expected a JSON array of rows (or an object holding one)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a JSON array of rows, got {type(data).__name__}")
    for i, row in enumerate(data):
        where = f"{p}: item {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


class Skips:
    """Rows skipped, by reason, for the converter's summary (``strict``: the first one raises)."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.by_reason: dict[str, list[str]] = {}

    def add(self, skip: RowSkip) -> None:
        if self.strict:
            raise DataError(str(skip)) from None
        self.by_reason.setdefault(skip.reason, []).append(skip.where)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.by_reason.values())

    def lines(self) -> list[str]:
        out = []
        for reason, wheres in self.by_reason.items():
            shown = ", ".join(_position(w) for w in wheres[:5])
            more = ", ..." if len(wheres) > 5 else ""
            out.append(f"skipped {len(wheres)} row(s) {reason}: {shown}{more}")
        return out


def _position(where: str) -> str:
    """``f.jsonl:3`` -> ``line 3``; ``f.parquet: row index 7`` -> ``row index 7``."""
    if ": " in where:
        return where.rsplit(": ", 1)[-1]
    return f"line {where.rsplit(':', 1)[-1]}"


@dataclass
class ConvertReport:
    """What a converter wrote: records, the verifier split, and the rows it skipped."""

    written: int
    verifiers: dict[str, int]
    skips: Skips
    renamed: int = 0
    """Records whose id repeated an earlier one's and got a suffix (``-2``, ``-3``, ...)."""

    def lines(self, domain: str, output: str) -> list[str]:
        split = ", ".join(f"{k} {v}" for k, v in sorted(self.verifiers.items()))
        out = [f"wrote {self.written} {domain} records to {output} (verifiers: {split})"]
        if self.renamed:
            out.append(f"made {self.renamed} repeated id(s) unique with a suffix (-2, -3, ...)")
        return out + self.skips.lines()
