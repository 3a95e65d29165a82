"""Save / load a model's weights as a torch_dist checkpoint (+ ``copd_meta.json``).

This is the weights-only path used for base models, merged models and imports from Hugging
Face. The directory is written under a temporary name and renamed when complete, so a crash never
leaves a directory that looks like a finished checkpoint.

Keys are ``model.sharded_state_dict(prefix="model.")``: global tensors, independent of TP/PP, so
a checkpoint saved at one layout loads at any other.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_copd.checkpoint.meta import META_FILE, read_meta, write_meta  # noqa: F401
from megatron_copd.errors import CheckpointError

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
        write_meta(tmp, meta)
        os.replace(tmp, final)
    dist.barrier()
    return final


def load_model(model, pgs, ckpt_dir: str | os.PathLike, process_group=None) -> dict[str, Any]:
    """Load weights into ``model`` (any TP/PP); returns the checkpoint's meta.

    ``process_group``: the ranks that load together (a branch group when several branches load
    different checkpoints at once); default the whole world.
    """
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    state = sharded_model_state(model, pgs)
    # Keys the model asks for that the checkpoint lacks come back instead of failing inside
    # the loader: Transformer Engine layers carry `_extra_state` (FP8 scaling metadata) that a
    # checkpoint written with local layers (CPU, HF import) does not have. Those keep the
    # layer's fresh state; any other missing key is an error.
    loaded, _, absent = dist_checkpointing.load(
        state, str(ckpt_dir), process_group=process_group, strict=StrictHandling.RETURN_UNEXPECTED
    )
    missing_weights = sorted(k for k in absent if not _is_extra_state(k))
    if missing_weights:
        shown = ", ".join(missing_weights[:3]) + (" ..." if len(missing_weights) > 3 else "")
        raise CheckpointError(
            f"{ckpt_dir}: {len(missing_weights)} weight(s) of the model are not in the "
            f"checkpoint ({shown}); does it match model.*?"
        )
    own = model.state_dict()
    weights = _strip_prefix(loaded)
    for key in own:
        if _is_extra_state(key) and key not in weights:
            weights[key] = own[key]
    model.load_state_dict(weights, strict=True)
    return meta


def _is_extra_state(key: str) -> bool:
    return key.split("/")[0].endswith("_extra_state")


def _strip_prefix(state: dict) -> dict:
    # Only the model's entries: a training checkpoint also holds optimizer/scheduler/common state.
    return {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
