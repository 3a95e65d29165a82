"""A base checkpoint's identity, for the merger's lineage check.

Every branch checkpoint records ``base_fingerprint = compute_fingerprint(base_dir)`` of the base
it started from (``copd_meta.json``); the merger refuses inputs whose fingerprints differ, and
``--base`` for task arithmetic must have that fingerprint itself.

The fingerprint hashes the model's tensor index (sorted keys, global shapes, dtypes) and a fixed
sample of every model tensor's stored bytes (first / middle / last row, up to 64 elements from the
start and middle of each). It reads only the index plus a few hundred bytes per tensor, so it is
cheap at any model size, and it depends only on global coordinates: the same weights saved at
any TP/PP give the same fingerprint.
"""

from __future__ import annotations

import hashlib
import os

import torch

from megatron_copd.checkpoint.torch_dist_io import TorchDistReader

MODEL_PREFIX = "model."
_SAMPLE = 64


def compute_fingerprint(ckpt: str | os.PathLike | TorchDistReader) -> str:
    """``"sha256:<32 hex>"`` of the model tensors of a torch_dist checkpoint."""
    reader = ckpt if isinstance(ckpt, TorchDistReader) else TorchDistReader(ckpt)
    try:
        h = hashlib.sha256()
        for key in sorted(k for k in reader.tensor_keys() if k.startswith(MODEL_PREFIX)):
            info = reader.info(key)
            h.update(f"{key}|{list(info.shape)}|{info.dtype}\n".encode())
            for offsets, sizes in _sample_boxes(info.shape):
                part = reader.read(key, offsets, sizes).contiguous()
                h.update(part.view(-1).view(torch.uint8).numpy().tobytes())
        return "sha256:" + h.hexdigest()[:32]
    finally:
        if reader is not ckpt:
            reader.close()


def _sample_boxes(shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    if not shape:
        return [((), ())]
    if any(s == 0 for s in shape):
        return []
    boxes = set()
    for row in {0, shape[0] // 2, shape[0] - 1}:
        inner = shape[1:]
        for mid in (False, True):
            # single index in every dim but the last, a run of up to _SAMPLE in the last
            lead = tuple((s // 2 if mid else 0) for s in inner[:-1])
            last_off = inner[-1] // 2 if (mid and inner) else 0
            if inner:
                n = min(_SAMPLE, inner[-1] - last_off)
                boxes.add(((row,) + lead + (last_off,), (1,) * len(inner) + (n,)))
            else:
                n = min(_SAMPLE, shape[0] - row)
                boxes.add(((row,), (n,)))
    return sorted(boxes)
