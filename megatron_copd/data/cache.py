"""Build-once directories shared by concurrent processes (toy world, toy tokenizer).

A directory is built in a hidden temporary sibling and renamed into place, so its presence means
it is complete. A lock file makes concurrent callers wait for the first builder instead of
repeating the work; where locking is unavailable (some network file systems) the first rename
wins and the others discard their copy.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_STALE_TMP_SECONDS = 3600.0


def build_once(final: Path, build: Callable[[Path], None], marker: str) -> bool:
    """Ensure ``final`` exists, calling ``build(tmp_dir)`` if needed; True if this call built it.

    ``marker`` is a file that ``build`` writes inside the directory; it is checked as well so
    a directory made by hand (or by an older layout) is not mistaken for a finished one.
    """
    if (final / marker).exists():  # fast path: a finished directory is never renamed away
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    with locked(final.parent / f"{final.name}.lock"):
        if (final / marker).exists():
            return False
        _remove_stale_tmp(final)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            build(tmp)
            if not (tmp / marker).exists():
                raise RuntimeError(f"builder of {final} did not write {marker}")
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / marker).exists():
                    raise
                return False  # another builder without a working lock won the rename
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return True


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if missing) for the duration of the block."""
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass  # no locking on this file system; the atomic rename still keeps results whole
        try:
            yield
        finally:
            try:
                fcntl.flock(f, fcntl.LOCK_UN)
            except OSError:
                pass


def _remove_stale_tmp(final: Path) -> None:
    """Temporary directories of builders that died (untouched for an hour)."""
    now = time.time()
    for p in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except FileNotFoundError:
            pass
