"""Refusals of the merger: inputs that do not belong together, bad weights, a bad output path.

Each check raises ``CheckpointError`` (or ``UserError`` for arguments) with one line naming the
checkpoint, key or argument and what was expected. Pure functions over readers and metadata.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_copd.checkpoint.torch_dist_io import COMMON_STATE_KEY, TorchDistReader
from megatron_copd.errors import CheckpointError, UserError

MODEL_PREFIX = "model."
METHODS = ("average", "task_arithmetic")


def check_arguments(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    weights: Sequence[float] | None,
    method: str,
    base: str | os.PathLike | None,
) -> list[float]:
    """Validate the request before touching any checkpoint; returns the raw weights."""
    if method not in METHODS:
        raise UserError(f"--method: expected one of {list(METHODS)}, got {method!r}")
    if not inputs:
        raise UserError("--inputs: at least one checkpoint is required")
    if method == "task_arithmetic" and base is None:
        raise UserError("--base: task_arithmetic needs the base checkpoint the inputs came from")
    if method == "average" and base is not None:
        raise UserError("--base: only used with --method task_arithmetic")
    resolved = [Path(p).resolve() for p in inputs]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise UserError(f"--inputs: {inputs[i]} is given twice")
    out = Path(output).resolve()
    for p in resolved + ([Path(base).resolve()] if base is not None else []):
        if out == p or p.is_relative_to(out) or out.is_relative_to(p):
            raise UserError(f"--output: {output} overlaps the checkpoint {p}")
    if weights is None:
        return [1.0 / len(inputs)] * len(inputs)
    weights = [float(w) for w in weights]
    if len(weights) != len(inputs):
        raise UserError(f"--weights: got {len(weights)} weights for {len(inputs)} inputs")
    for w in weights:
        if not math.isfinite(w) or w < 0:
            raise UserError(f"--weights: expected finite non-negative numbers, got {w}")
    if sum(weights) <= 0:
        raise UserError("--weights: the weights sum to zero")
    return weights


def check_same_model(readers: Sequence[TorchDistReader]) -> None:
    first = readers[0]
    for r in readers[1:]:
        if r.model_config != first.model_config:
            field = _first_difference(first.model_config, r.model_config)
            raise CheckpointError(
                f"{r.path}: model config differs from {first.path} at 'model.{field}' "
                f"({_get(r.model_config, field)!r} vs {_get(first.model_config, field)!r})"
            )


def check_lineage(readers: Sequence[TorchDistReader], base: TorchDistReader | None) -> str:
    """All inputs descend from one base; returns its fingerprint.

    An input without ``base_fingerprint`` is accepted only when it IS that base (its own
    fingerprint matches), e.g. interpolating a branch with its starting point.
    """
    recorded = {r.path: r.meta.get("base_fingerprint") for r in readers}
    known = [fp for fp in recorded.values() if fp]
    if not known:
        raise CheckpointError(
            f"{readers[0].path}: no base_fingerprint in copd_meta.json; cannot tell whether the "
            "inputs descend from the same base"
        )
    expected = known[0]
    first = next(r for r in readers if recorded[r.path] == expected)
    for r in readers:
        fp = recorded[r.path] or r.fingerprint
        if fp != expected:
            raise CheckpointError(
                f"{r.path}: descends from base {fp}, but {first.path} from {expected}; "
                "only branches of the same base can be merged"
            )
    if base is not None and base.fingerprint != expected:
        raise CheckpointError(
            f"{base.path}: --base has fingerprint {base.fingerprint}, but the inputs descend "
            f"from {expected}"
        )
    return expected


def select_keys(reader: TorchDistReader, include_optimizer: bool) -> tuple[list[str], list[str]]:
    """(tensor keys, non-tensor keys) that go to the output, in the reader's order."""
    if include_optimizer:
        return reader.tensor_keys(), reader.bytes_keys()
    tensors = [k for k in reader.tensor_keys() if k.startswith(MODEL_PREFIX)]
    objects = [
        k for k in reader.bytes_keys() if k.startswith(MODEL_PREFIX) or k == COMMON_STATE_KEY
    ]
    return tensors, objects


def check_same_keys(readers: Sequence[TorchDistReader], include_optimizer: bool) -> None:
    first = readers[0]
    ref_t, ref_b = map(set, select_keys(first, include_optimizer))
    for r in readers[1:]:
        t, b = map(set, select_keys(r, include_optimizer))
        for mine, theirs in ((t, ref_t), (b, ref_b)):
            if mine != theirs:
                missing, extra = sorted(theirs - mine), sorted(mine - theirs)
                if missing:
                    raise CheckpointError(
                        f"{r.path}: key {missing[0]!r} is missing (present in {first.path})"
                        + (f"; {len(missing) - 1} more" if len(missing) > 1 else "")
                    )
                raise CheckpointError(
                    f"{r.path}: key {extra[0]!r} is not in {first.path}"
                    + (f"; {len(extra) - 1} more" if len(extra) > 1 else "")
                )
        for key in sorted(ref_t):
            a, b_ = first.info(key), r.info(key)
            if a.shape != b_.shape:
                raise CheckpointError(
                    f"{r.path}: {key!r} has shape {list(b_.shape)}, {first.path} has "
                    f"{list(a.shape)}"
                )


def resolve_dtype(
    readers: Sequence[TorchDistReader], keys: Sequence[str], dtype: torch.dtype | None
) -> dict[str, torch.dtype]:
    """Output dtype per tensor: ``dtype`` for floating tensors when given, else the inputs'
    (which must then agree); non-floating tensors keep their dtype."""
    out = {}
    for key in keys:
        dtypes = [r.info(key).dtype for r in readers]
        if not dtypes[0].is_floating_point:
            if any(d != dtypes[0] for d in dtypes):
                raise CheckpointError(
                    f"{key!r}: stored as {sorted(set(map(str, dtypes)))} across inputs"
                )
            out[key] = dtypes[0]
        elif dtype is not None:
            out[key] = dtype
        else:
            i = next((i for i, d in enumerate(dtypes) if d != dtypes[0]), None)
            if i is not None:
                raise CheckpointError(
                    f"{key!r}: {readers[0].path} stores {dtypes[0]}, {readers[i].path} stores "
                    f"{dtypes[i]}; choose the output with --dtype"
                )
            out[key] = dtypes[0]
    return out


def check_objects_compatible(readers: Sequence[TorchDistReader], keys: Sequence[str]) -> None:
    """Non-tensor entries (common state, ``_extra_state``) are copied from the first input; the
    others must hold the same structure (values such as FP8 scaling factors may differ)."""
    first = readers[0]
    for key in keys:
        ref = _signature(first, key)
        for r in readers[1:]:
            if _signature(r, key) != ref:
                raise CheckpointError(
                    f"{r.path}: non-tensor entry {key!r} has a different structure than in "
                    f"{first.path}"
                )


def weights_only_common_state(reader: TorchDistReader) -> dict[str, Any] | None:
    """The model part of megatron's common state (top-level keys under ``model.``); None when
    the checkpoint has none."""
    if COMMON_STATE_KEY not in reader.bytes_keys():
        return None
    state = reader.read_object(COMMON_STATE_KEY)
    state = state[0] if isinstance(state, list) and len(state) == 1 else state
    if not isinstance(state, dict):
        raise CheckpointError(f"{reader.path}: common state is {type(state).__name__}, not a dict")
    return {k: v for k, v in state.items() if str(k).startswith(MODEL_PREFIX)}


def _signature(reader: TorchDistReader, key: str) -> Any:
    try:
        obj = reader.read_object(key)
    except CheckpointError:
        return ("opaque",)  # not weights_only-decodable (e.g. pickled TE state): presence only
    if key == COMMON_STATE_KEY:
        obj = weights_only_common_state(reader)
    return _structure(obj)


def _structure(obj: Any) -> Any:
    if isinstance(obj, dict):
        return ("dict", tuple(sorted((str(k), _structure(v)) for k, v in obj.items())))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(_structure(v) for v in obj))
    if isinstance(obj, torch.Tensor):
        return ("tensor", str(obj.dtype), tuple(obj.shape))
    return (type(obj).__name__,)


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return prefix.rstrip(".") or "?"


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d
