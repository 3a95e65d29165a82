"""Checkpoint directory conventions: names, completeness, the ``latest`` pointer, file checks.

A branch's checkpoints live in ``<run_dir>/checkpoints/<branch>/``:

- ``iter_<N>/`` (N zero-padded to 7 digits) is a checkpoint. It is *complete* when its name has
  no suffix and it holds ``copd_meta.json`` - the completion marker, written after every rank's
  shards, ``.metadata`` and ``metadata.json``; the directory is written as ``iter_<N>.tmp`` and
  renamed only then.
- anything else named ``iter_*`` (``iter_<N>.tmp``, ``iter_<N>.deleting``, or ``iter_<N>``
  without the marker) is incomplete: reported and never loaded.
- ``latest`` is a text file holding the name of the newest complete checkpoint
  (``iter_0000040``), replaced atomically.

No process groups here: plain file-system logic shared by the trainer and offline tools.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

from megatron_copd.checkpoint.meta import META_FILE, read_meta  # noqa: F401 (re-exported)
from megatron_copd.errors import CheckpointError

LATEST_FILE = "latest"
TMP_SUFFIX = ".tmp"
DELETING_SUFFIX = ".deleting"
_ITER_RE = re.compile(r"^iter_(\d+)$")
_ANY_ITER_RE = re.compile(r"^iter_(\d+)(\..*)?$")


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def parse_iter_name(name: str) -> int | None:
    m = _ITER_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass
class BranchScan:
    """What ``checkpoints/<branch>/`` holds."""

    branch_dir: Path
    complete: dict[int, Path] = field(default_factory=dict)
    incomplete: list[str] = field(default_factory=list)
    """``name (reason)`` of every directory that must not be loaded."""
    latest: int | None = None
    """The iteration ``latest`` names, when it names a complete checkpoint."""
    latest_problem: str | None = None
    """Why ``latest`` could not be used (absent is not a problem when nothing is complete)."""

    def report(self) -> str | None:
        """One line about incomplete directories, or None."""
        if not self.incomplete:
            return None
        return (f"{self.branch_dir}: ignoring incomplete checkpoint directories: "
                + ", ".join(self.incomplete))


def scan_branch_dir(branch_dir: str | os.PathLike) -> BranchScan:
    branch_dir = Path(branch_dir)
    scan = BranchScan(branch_dir)
    if not branch_dir.is_dir():
        return scan
    for entry in sorted(branch_dir.iterdir()):
        m = _ANY_ITER_RE.match(entry.name)
        if not m or not entry.is_dir():
            continue
        if m.group(2):
            reason = {TMP_SUFFIX: "unfinished write", DELETING_SUFFIX: "unfinished delete"}.get(
                m.group(2), "unexpected suffix"
            )
            scan.incomplete.append(f"{entry.name} ({reason})")
        elif not (entry / META_FILE).is_file():
            scan.incomplete.append(f"{entry.name} (no {META_FILE})")
        else:
            scan.complete[int(m.group(1))] = entry
    text = read_latest(branch_dir)
    if text is None:
        if scan.complete:
            scan.latest_problem = f"no {LATEST_FILE} file"
    else:
        n = parse_iter_name(text)
        if n is None:
            scan.latest_problem = f"{LATEST_FILE} holds {text[:40]!r}, expected iter_<N>"
        elif n not in scan.complete:
            scan.latest_problem = f"{LATEST_FILE} names {text}, which is not a complete checkpoint"
        else:
            scan.latest = n
    return scan


def read_latest(branch_dir: str | os.PathLike) -> str | None:
    path = Path(branch_dir) / LATEST_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        return f"<unreadable: {e}>"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``path`` so that readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_latest(branch_dir: str | os.PathLike, iteration: int) -> None:
    write_text_atomic(Path(branch_dir) / LATEST_FILE, iter_name(iteration) + "\n")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename a finished ``iter_<N>.tmp`` to ``iter_<N>`` (durably)."""
    os.replace(tmp, final)
    _fsync_dir(final.parent)




def verify_files(ckpt_dir: str | os.PathLike) -> None:
    """Check that the torch_dist files of a checkpoint are all there and long enough.

    Reads ``.metadata`` (the torch DCP index: every entry's file, offset and length), then checks
    every data file it lists exists and covers the listed bytes, and that ``metadata.json``
    parses. Raises CheckpointError (one line) naming the first problem.
    """
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / ".metadata"
    if not index.is_file():
        raise CheckpointError(f"{ckpt_dir}: missing .metadata (the torch_dist index)")
    try:
        with open(index, "rb") as f:
            metadata = pickle.load(f)
        storage = metadata.storage_data
        needed: dict[str, int] = {}
        for info in storage.values():
            end = int(info.offset) + int(info.length)
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupted index
        raise CheckpointError(
            f"{index}: corrupted metadata ({type(e).__name__}: {str(e)[:120]})"
        ) from None
    for name, end in sorted(needed.items()):
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"{ckpt_dir}: missing shard file {name} (listed in .metadata)")
        size = path.stat().st_size
        if size < end:
            raise CheckpointError(
                f"{path}: truncated shard file ({size} bytes, .metadata expects >= {end})"
            )
    config = ckpt_dir / "metadata.json"
    try:
        backend = json.loads(config.read_text()).get("sharded_backend")
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir}: missing metadata.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{config}: corrupted metadata ({e})") from None
    if backend != "torch_dist":
        raise CheckpointError(f"{config}: sharded_backend is {backend!r}, expected 'torch_dist'")
