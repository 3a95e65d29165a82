"""Prompt records: load and validate JSONL / Parquet prompt datasets.

One row is one prompt with a checkable answer::

    {"id": "gsm-17", "domain": "text", "prompt": "What is 3 + 4?", "answer": "7",
     "images": ["img/17.png"], "video": ["f/0.png", "f/1.png"], "reward": "math",
     "source": "gsm8k"}

Required: ``id``, ``prompt``, ``answer`` and ``domain`` (``domain`` may be supplied for a whole
file with ``default_domain``). Optional: ``images`` (list of paths), ``video`` (a video file path
or a list of frame paths), ``reward`` (verifier name; null = the domain's default). Every other
column goes to ``meta`` (a ``meta`` column holding a mapping is merged into it).

Decisions (one place, so users can look them up):
- ``id`` may be a string or an integer (converted with ``str``); ids must be unique over
  everything loaded together (:func:`load_many` checks across files).
- ``answer`` may be a non-empty string or a number; numbers are converted to strings (integers
  exactly, floats by Python's shortest round-trip ``repr``) so ``"answer": 0.5`` works for the
  math and numeric verifiers. Booleans, null, lists and mappings are rejected.
- Media paths are resolved relative to the data file's directory (absolute paths stay as they
  are) and must exist when the file is loaded, so a typo fails at start-up and not mid-run.
- In JSONL, blank lines are skipped; line numbers in messages are 1-based. In Parquet, messages
  name the 0-based row index (``row index 17``).

Every problem raises :class:`~megatron_copd.errors.DataError` with one line naming the file, the
line (or row index), the field and what was expected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_copd.errors import DataError

__all__ = ["PromptRecord", "load_records", "load_many", "write_jsonl", "KNOWN_FIELDS"]

KNOWN_FIELDS = ("id", "domain", "prompt", "answer", "images", "video", "reward", "meta")


@dataclass
class PromptRecord:
    """One prompt of a dataset, validated; media paths are absolute (or as given if absolute)."""

    id: str
    domain: str
    prompt: str
    answer: str
    images: list[str] = field(default_factory=list)
    """Image file paths, in the order the prompt refers to them."""
    video: list[str] | str | None = None
    """Frame paths (list) or one video file path (str); None when the prompt has no video."""
    reward: str | None = None
    """Verifier name (see megatron_copd.rewards); None = the domain's default verifier."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Every further column of the row, unchanged."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict with the same fields (the inverse of one JSONL row, paths resolved)."""
        d: dict[str, Any] = {
            "id": self.id,
            "domain": self.domain,
            "prompt": self.prompt,
            "answer": self.answer,
        }
        if self.images:
            d["images"] = list(self.images)
        if self.video is not None:
            d["video"] = self.video if isinstance(self.video, str) else list(self.video)
        if self.reward is not None:
            d["reward"] = self.reward
        if self.meta:
            d["meta"] = dict(self.meta)
        return d


def _show(value: Any) -> str:
    """A short rendering of a bad value for an error message (JSON spelling, truncated)."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _RowChecker:
    """Validates one row; ``where`` is the ``file:line`` / ``file: row index N`` prefix."""

    def __init__(
        self,
        where: str,
        base_dir: Path,
        default_domain: str | None,
        check_media: bool,
        known_rewards: Collection[str] | None,
        domains: Collection[str] | None = None,
        media: bool = True,
    ):
        self.where = where
        self.domains = domains
        self.media = media
        self.base_dir = base_dir
        self.default_domain = default_domain
        self.check_media = check_media
        self.known_rewards = known_rewards

    def fail(self, msg: str) -> DataError:
        return DataError(f"{self.where}: {msg}")

    def text(self, row: dict, name: str, *, required: bool = True) -> str | None:
        if name not in row or row[name] is None:
            if not required:
                return None
            if name not in row:
                raise self.fail(f"missing field '{name}'")
            raise self.fail(f"field '{name}': expected a string, got null")
        v = row[name]
        if not isinstance(v, str):
            raise self.fail(f"field '{name}': expected a string, got {_show(v)}")
        if not v.strip():
            raise self.fail(f"field '{name}': expected a non-empty string, got {_show(v)}")
        return v

    def record_id(self, row: dict) -> str:
        if "id" not in row:
            raise self.fail("missing field 'id'")
        v = row["id"]
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        if not isinstance(v, str) or not v.strip():
            raise self.fail(
                f"field 'id': expected a non-empty string or an integer, got {_show(v)}"
            )
        return v

    def answer(self, row: dict) -> str:
        if "answer" not in row:
            raise self.fail("missing field 'answer'")
        v = row["answer"]
        if isinstance(v, bool) or v is None:
            raise self.fail(f"field 'answer': expected a string, got {_show(v)}")
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                raise self.fail(f"field 'answer': expected a string or finite number, got {v}")
            return repr(v)
        if not isinstance(v, str):
            raise self.fail(f"field 'answer': expected a string, got {_show(v)}")
        if not v.strip():
            raise self.fail(f"field 'answer': expected a non-empty string, got {_show(v)}")
        return v

    def media_path(self, label: str, v: Any) -> str:
        if not isinstance(v, str) or not v.strip():
            raise self.fail(f"{label}: expected a file path (string), got {_show(v)}")
        p = Path(v).expanduser()
        if not p.is_absolute():
            p = self.base_dir / p
        if self.check_media and not p.is_file():
            raise self.fail(f"{label}: file not found: {p}")
        return str(p)

    def no_media(self, name: str) -> None:
        if not self.media:
            raise self.fail(f"field '{name}': the model has no vision tower (model.vision / "
                            "model.qwen_vl unset); remove the media or use a vision model")

    def images(self, row: dict) -> list[str]:
        v = row.get("images")
        if v is None:
            return []
        self.no_media("images")
        if not isinstance(v, list):
            raise self.fail(f"field 'images': expected a list of file paths, got {_show(v)}")
        return [self.media_path(f"images[{i}]", p) for i, p in enumerate(v)]

    def video(self, row: dict) -> list[str] | str | None:
        v = row.get("video")
        if v is None:
            return None
        self.no_media("video")
        if isinstance(v, str):
            return self.media_path("video", v)
        if not isinstance(v, list) or not v:
            raise self.fail(
                f"field 'video': expected a video file path or a non-empty list of frame paths, "
                f"got {_show(v)}"
            )
        return [self.media_path(f"video[{i}]", p) for i, p in enumerate(v)]

    def reward(self, row: dict) -> str | None:
        v = self.text(row, "reward", required=False)
        if v is not None and self.known_rewards is not None and v not in self.known_rewards:
            raise self.fail(
                f"field 'reward': unknown verifier {v!r}; known: {sorted(self.known_rewards)}"
            )
        return v

    def check(self, row: Any) -> PromptRecord:
        if not isinstance(row, dict):
            kind = "a list" if isinstance(row, list) else _show(row)
            raise self.fail(f"expected a JSON object (one record per line), got {kind}")
        rid = self.record_id(row)
        if row.get("domain") is None and self.default_domain is not None:
            domain = self.default_domain
        else:
            domain = self.text(row, "domain")
        if self.domains is not None and domain not in self.domains:
            raise self.fail(f"field 'domain': {domain!r} is not one of this data's domains "
                            f"{sorted(self.domains)}")
        prompt = self.text(row, "prompt")
        answer = self.answer(row)
        images = self.images(row)
        video = self.video(row)
        reward = self.reward(row)
        meta: dict[str, Any] = {}
        if row.get("meta") is not None:
            if not isinstance(row["meta"], dict):
                raise self.fail(f"field 'meta': expected a mapping, got {_show(row['meta'])}")
            meta.update(row["meta"])
        meta.update({k: v for k, v in row.items() if k not in KNOWN_FIELDS})
        return PromptRecord(rid, domain, prompt, answer, images, video, reward, meta)


def _jsonl_rows(path: Path, shown: str) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{shown}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            yield where, row


def _parquet_rows(path: Path, shown: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a non-Parquet file
        raise DataError(f"{shown}: not a readable Parquet file ({e})") from None
    index = 0
    # Batches keep memory bounded for large files; the row index runs over the whole file.
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield f"{shown}: row index {index}", row
            index += 1


def _rows(path: Path, shown: str) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path, shown)
    if suffix == ".parquet":
        return _parquet_rows(path, shown)
    raise DataError(
        f"{shown}: unsupported file type {suffix or '(none)'!r}; expected .jsonl or .parquet"
    )


def _load(path: str | os.PathLike, seen: dict[str, str], checks: dict[str, Any]
          ) -> list[PromptRecord]:
    shown = os.fspath(path)
    p = Path(shown).expanduser()
    if not p.is_file():
        raise DataError(f"{shown}: file not found")
    base_dir = p.resolve().parent
    out: list[PromptRecord] = []
    for where, row in _rows(p, shown):
        rec = _RowChecker(where, base_dir, **checks).check(row)
        if rec.id in seen:
            raise DataError(f"{where}: duplicate id {rec.id!r} (first at {seen[rec.id]})")
        seen[rec.id] = where
        out.append(rec)
    if not out:
        raise DataError(f"{shown}: no records (empty file); expected at least one prompt row")
    return out


def load_records(
    path: str | os.PathLike,
    *,
    default_domain: str | None = None,
    check_media: bool = True,
    known_rewards: Collection[str] | None = None,
    domains: Collection[str] | None = None,
    media: bool = True,
) -> list[PromptRecord]:
    """Load and validate every row of one ``.jsonl`` or ``.parquet`` file.

    ``default_domain`` fills rows without a ``domain``; ``check_media=False`` skips the
    existence check of image/video files; ``known_rewards`` (e.g. ``available_verifiers()``)
    makes an unknown ``reward`` name a load-time error; ``domains`` makes a row of any other
    domain one; ``media=False`` (a text-only model) refuses rows with images or video.
    Raises DataError on the first bad row.
    """
    return load_many([path], default_domain=default_domain, check_media=check_media,
                     known_rewards=known_rewards, domains=domains, media=media)


def load_many(
    paths: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    default_domain: str | None = None,
    check_media: bool = True,
    known_rewards: Collection[str] | None = None,
    domains: Collection[str] | None = None,
    media: bool = True,
) -> list[PromptRecord]:
    """Load several files in order and concatenate; ids must be unique across all of them.
    The checks are :func:`load_records`'s."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise DataError("no data files given: expected at least one .jsonl or .parquet path")
    checks = dict(default_domain=default_domain, check_media=check_media,
                  known_rewards=known_rewards, domains=domains, media=media)
    seen: dict[str, str] = {}
    out: list[PromptRecord] = []
    for p in paths:
        out.extend(_load(p, seen, checks))
    return out


def write_jsonl(records: Sequence[PromptRecord], path: str | os.PathLike) -> None:
    """Write records as JSONL (temp name, then rename: never a half-written file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
