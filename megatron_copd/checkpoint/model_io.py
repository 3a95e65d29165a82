"""Save / load a model's weights as a torch_dist checkpoint (+ ``copd_meta.json``).

This is the weights-only path used for base models, merged models and imports from Hugging
Face. The directory is written under a temporary name and renamed when complete, so a crash never
leaves a directory that looks like a finished checkpoint.

Keys are ``model.sharded_state_dict(prefix="model.")``: global tensors, independent of TP/PP, so
a checkpoint saved at one layout loads at any other.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_copd.errors import CheckpointError

META_FILE = "copd_meta.json"
MODEL_PREFIX = "model."


def sharded_model_state(model, pgs) -> dict:
    return model.sharded_state_dict(prefix=MODEL_PREFIX, metadata={"dp_cp_group": pgs.dp_cp})


def save_model(model, pgs, ckpt_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Collective over the whole world: every rank holds a stage/shard of the same model."""
    final = Path(ckpt_dir)
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        if final.exists():
            raise CheckpointError(f"{final}: already exists")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(sharded_model_state(model, pgs), str(tmp))
    if dist.get_rank() == 0:
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp, final)
    dist.barrier()
    return final


def read_meta(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: not a megatron-copd checkpoint (no {META_FILE})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupted metadata ({e.msg} at line {e.lineno})") from None


def load_model(model, pgs, ckpt_dir: str | os.PathLike, process_group=None) -> dict[str, Any]:
    """Load weights into ``model`` (any TP/PP); returns the checkpoint's meta.

    ``process_group``: the ranks that load together (a branch group when several branches load
    different checkpoints at once); default the whole world.
    """
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    state = sharded_model_state(model, pgs)
    loaded = dist_checkpointing.load(state, str(ckpt_dir), process_group=process_group)
    model.load_state_dict(_strip_prefix(loaded), strict=True)
    return meta


def _strip_prefix(state: dict) -> dict:
    # Only the model's entries: a training checkpoint also holds optimizer/scheduler/common state.
    return {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
