"""``copd_meta.json``: what a checkpoint directory is, beside megatron's shards.

Fields every checkpoint written by this project carries (others may add more):

- ``format``: this file's version (``META_FORMAT``).
- ``model``: the ``ModelConfig`` section as a plain mapping; two checkpoints merge only when these
  are equal.
- ``branch``: the branch name (``"merged"`` for a merge, ``"base"`` for a base model).
- ``base_fingerprint``: :func:`megatron_copd.checkpoint.fingerprint.compute_fingerprint` of the
  base checkpoint every branch started from — the lineage check of the merger.

Deliberately light (json only): tools that stream checkpoints import it without megatron.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megatron_copd.errors import CheckpointError

META_FILE = "copd_meta.json"
META_FORMAT = 1


def read_meta(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: not a megatron-copd checkpoint (no {META_FILE})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupted metadata ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: corrupted metadata ({e.reason})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupted metadata (expected a JSON object)")
    return meta


def write_meta(ckpt_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    path = Path(ckpt_dir) / META_FILE
    path.write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def make_meta(
    model: Any, branch: str, base_fingerprint: str | None, **extra: Any
) -> dict[str, Any]:
    """The meta of a branch / base checkpoint. ``model`` is a ``ModelConfig`` or its mapping."""
    from megatron_copd.config_base import to_dict

    return {
        "format": META_FORMAT,
        "model": to_dict(model),
        "branch": branch,
        "base_fingerprint": base_fingerprint,
        **extra,
    }
