"""Hugging Face model directory -> torch_dist checkpoint of this project's model.

    result = import_from_hf("Qwen3-4B/", "ckpt/qwen3-4b")

Streams tensor by tensor (a transformer layer, or a block of embedding rows, at a time): the HF
tensors are read from the safetensors shards, fused into the megatron tensor and written as one
chunk per layer with :class:`TorchDistWriter`, by a few threads (one data file each); no model is
built, no process group needed; memory is a few layers.
The output is layout-free — torch_dist stores global tensors — so it loads at any TP/PP (there is
nothing to choose at import time).

Output directory (published atomically when complete):

- the torch_dist shards + ``copd_meta.json`` (``model``: the ModelConfig derived from
  config.json; ``branch: base``; ``hf_source``);
- ``tokenizer/``: the HF tokenizer files + ``copd_tokenizer.json`` (``data.tokenizer``);
- ``copd_model.yaml``: the config snippet (``model``, ``data.tokenizer``, ``checkpoint.load``)
  to merge into a run config.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from megatron_copd.config import ModelConfig
from megatron_copd.config_base import to_dict
from megatron_copd.errors import CheckpointError
from megatron_copd.models.conversion import families
from megatron_copd.models.conversion import mapping as mp
from megatron_copd.models.conversion.families import model_config_from_hf
from megatron_copd.models.conversion.hf_config import LLAVA_ARCH, QWEN_VL_DECODERS, HFModelInfo
from megatron_copd.models.conversion.hf_tokenizer import copy_hf_tokenizer
from megatron_copd.models.conversion.safetensors_io import HFCheckpoint

TOKENIZER_DIR = "tokenizer"
SNIPPET_FILE = "copd_model.yaml"
DEFAULT_BLOCK_BYTES = 16 << 20
QWEN_VL_VERSIONS = {arch: version for version, (_, arch) in QWEN_VL_DECODERS.items()}


@dataclass
class ImportResult:
    output: Path
    model: ModelConfig
    architecture: str
    image_token_id: int | None
    tokenizer: Path | None
    tensors: int
    bytes_written: int
    seconds: float


def read_hf_config(hf_dir: Path, text_only: bool = False) -> tuple[dict, HFModelInfo]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    return cfg, model_config_from_hf(cfg, str(path), text_only=text_only)


def detect_names(ckpt: HFCheckpoint, info: HFModelInfo, source_arch: str) -> mp.HFNames:
    """Which naming layout the HF weights use (``source_arch``: config.json's architecture)."""
    if source_arch in QWEN_VL_VERSIONS:  # the whole model or (--text-only) its decoder
        candidates: tuple[mp.HFNames, ...] = mp.QWEN_VL_NAMES[QWEN_VL_VERSIONS[source_arch]]
    elif source_arch == LLAVA_ARCH:
        candidates = mp.LLAVA_IMPORT_VARIANTS
    else:
        candidates = (mp.TEXT_NAMES,)
    for names in candidates:
        if f"{names.lm}embed_tokens.weight" not in ckpt:
            continue
        if info.is_vlm and f"{names.vision}embeddings.patch_embedding.weight" not in ckpt:
            continue
        return names
    want = f"{candidates[0].lm}embed_tokens.weight"
    sample = ", ".join(sorted(ckpt.keys())[:3])
    raise CheckpointError(
        f"{ckpt.path}: weights do not match {info.architecture} (no {want!r}; found e.g. "
        f"{sample})"
    )


def check_weights(ckpt: HFCheckpoint, maps: mp.ModelMapping, where: str) -> None:
    """Every expected tensor present with the shape config.json implies; nothing unexplained."""
    expected: set[str] = set()
    for p in maps.params:
        shapes = p.hf_shapes()
        for layer in range(p.layers) if p.layers else [None]:
            for name, shape in zip(p.hf_names(layer), shapes):
                expected.add(name)
                if name not in ckpt:
                    raise CheckpointError(f"{ckpt.path}: tensor {name!r} is missing ({where} "
                                          f"implies it)")
                got = ckpt.shape(name)
                if got != tuple(shape):
                    raise CheckpointError(
                        f"{ckpt.path}: tensor {name!r} has shape {list(got)}, but {where} "
                        f"implies {list(shape)}"
                    )
    unknown = [k for k in ckpt.keys() if k not in expected and not maps.is_ignored(k)]
    if unknown:
        more = f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise CheckpointError(
            f"{ckpt.path}: unexpected tensor {min(unknown)!r}{more}: not part of the model "
            f"{where} describes"
        )


def import_from_hf(
    hf_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    workers: int = 4,
    text_only: bool = False,
) -> ImportResult:
    """Convert ``hf_dir`` into a torch_dist checkpoint at ``output`` (see the module doc).

    ``text_only``: import only the language model of a VLM (LLaVA; Qwen3-VL, whose vision tower
    this project cannot represent)."""
    t0 = time.perf_counter()
    hf_dir, output = Path(hf_dir), Path(output)
    _, info = read_hf_config(hf_dir, text_only)
    ckpt = HFCheckpoint(hf_dir)
    try:
        return _import(ckpt, info, hf_dir, output, dtype, overwrite, block_bytes, workers, t0)
    finally:
        ckpt.close()


def _import(ckpt: HFCheckpoint, info: HFModelInfo, hf_dir: Path, output: Path,
            dtype: torch.dtype | None, overwrite: bool, block_bytes: int, workers: int,
            t0: float) -> ImportResult:
    from megatron_copd.checkpoint.meta import make_meta
    from megatron_copd.checkpoint.torch_dist_io import TorchDistWriter

    names = detect_names(ckpt, info, info.architecture)
    maps = families.import_maps(info, names)
    is_vlm = info.model.vision is not None or info.model.qwen_vl is not None
    if not is_vlm and names.vision:  # --text-only import of a VLM
        skipped = [re.escape(p) + ".*" for p in (names.vision, names.projector) if p]
        maps = dataclasses.replace(maps, ignored_hf=maps.ignored_hf + tuple(skipped))
    check_weights(ckpt, maps, f"{hf_dir / 'config.json'}")
    first = maps.params[0].hf_names(None)[0]
    dtype = dtype or info.dtype or ckpt.dtype(first)

    with TorchDistWriter(output, overwrite=overwrite, num_files=max(1, workers)) as writer:
        for p in maps.params:
            writer.declare_tensor(mp.MODEL_PREFIX + p.mcore, p.stored_shape, dtype)
        # One data file per worker thread: reads, fusing and writes of different layers overlap.
        local, counter = threading.local(), itertools.count()

        def run(item: tuple) -> None:
            if not hasattr(local, "file"):
                local.file = next(counter) % max(1, workers)
            _write_item(writer, ckpt, dtype, local.file, *item)

        with ThreadPoolExecutor(max(1, workers)) as pool:
            for _ in pool.map(run, _work_items(maps, dtype, block_bytes)):
                pass
        for key in mp.extra_state_keys(info.model):
            writer.write_object(mp.MODEL_PREFIX + key, None)
        writer.write_common_state({})
        tok_dir = writer.tmp / TOKENIZER_DIR
        tok = copy_hf_tokenizer(hf_dir, tok_dir, info.image_token_id)
        if tok and info.model.qwen_vl is not None:
            families.copy_processor_files(hf_dir, tok_dir)
        writer.meta = make_meta(
            info.model, "base", None,
            hf_source={"path": str(hf_dir.resolve()), "architecture": info.architecture,
                       "image_token_id": info.image_token_id},
            tokenizer=TOKENIZER_DIR if tok else None,
        )
        snippet = {"model": to_dict(info.model), "checkpoint": {"load": str(output.resolve())}}
        if tok:
            snippet["data"] = {"world": "files",
                               "tokenizer": str((output / TOKENIZER_DIR).resolve())}
        (writer.tmp / SNIPPET_FILE).write_text(
            f"# Imported from {hf_dir.resolve()} ({info.architecture}); merge into a run "
            f"config.\n" + yaml.safe_dump(snippet, sort_keys=False)
        )
        writer.commit()
        written = writer.bytes_written
    return ImportResult(
        output=output,
        model=info.model,
        architecture=info.architecture,
        image_token_id=info.image_token_id,
        tokenizer=(output / TOKENIZER_DIR) if tok else None,
        tensors=len(maps.params),
        bytes_written=written,
        seconds=time.perf_counter() - t0,
    )


def _work_items(maps: mp.ModelMapping, dtype: torch.dtype, block_bytes: int):
    """(param, layer, rows): one transformer layer, a block of rows, or a whole tensor."""
    for p in maps.params:
        if p.layers:
            for layer in range(p.layers):
                yield p, layer, None
            continue
        rows = p.shape[0] if p.shape else 0
        row_bytes = _numel(p.shape[1:]) * dtype.itemsize
        if p.op is mp.COPY and rows * row_bytes > block_bytes:
            step = max(1, block_bytes // row_bytes)
            for start in range(0, rows, step):
                yield p, None, (start, min(rows, start + step))
        else:
            yield p, None, None


def _write_item(writer, ckpt: HFCheckpoint, dtype: torch.dtype, file: int, p: mp.ParamMap,
                layer: int | None, rows: tuple[int, int] | None) -> None:
    key = mp.MODEL_PREFIX + p.mcore
    if rows is not None:
        part = ckpt.get_rows(p.hf_names(None)[0], *rows).to(dtype)
        writer.write_chunk(key, (rows[0],) + (0,) * (len(p.shape) - 1), part, file)
        return
    t = p.to_mcore([ckpt.get(n) for n in p.hf_names(layer)]).to(dtype).contiguous()
    if layer is None:
        writer.write_chunk(key, (0,) * len(p.shape), t, file)
    else:
        writer.write_chunk(key, (layer,) + (0,) * len(p.shape), t.unsqueeze(0), file)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
