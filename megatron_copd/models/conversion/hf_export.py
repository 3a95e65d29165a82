"""torch_dist checkpoint (any TP/PP at save; merged or one branch) -> Hugging Face directory.

    result = convert_to_hf("runs/x/merged", "hf/merged")

No model is built: :class:`TorchDistReader` reads each megatron tensor (one transformer layer,
or a block of embedding rows, at a time) straight from the shards at its global coordinates,
the mapping splits it into its HF tensors, and :class:`ShardWriter` writes them into safetensors
shards planned up front. A few worker threads overlap reads, splits and writes; memory is a few
layers, whatever the model size. Everything goes to a temporary sibling directory that is renamed
to ``output`` only when complete.

Output: ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``, ``config.json``,
``generation_config.json``, tokenizer files (HF tokenizers copied; a SentencePiece tokenizer
converted to ``tokenizer.json``), and for a VLM ``preprocessor_config.json`` +
``processor_config.json`` (CLIP image processor with this project's resize and normalisation).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_copd.config import ModelConfig
from megatron_copd.config_base import ConfigError, from_dict
from megatron_copd.errors import CheckpointError
from megatron_copd.models.conversion import families
from megatron_copd.models.conversion import mapping as mp
from megatron_copd.models.conversion.hf_config import SpecialTokens, generation_config
from megatron_copd.models.conversion.hf_tokenizer import TokenizerInfo, export_tokenizer
from megatron_copd.models.conversion.safetensors_io import (
    INDEX_FILE,
    ShardWriter,
    plan_shards,
)

DEFAULT_SHARD_BYTES = 5 << 30
DEFAULT_BLOCK_BYTES = 16 << 20
EMBEDDING = "language_model.embedding.word_embeddings.weight"


@dataclass
class ExportResult:
    output: Path
    architecture: str
    tensors: int
    shards: int
    bytes_written: int
    seconds: float


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A torch_dist directory, or a branch directory whose ``latest`` names one."""
    from megatron_copd.checkpoint.torch_dist_io import is_torch_dist_checkpoint

    p = Path(path)
    if (p / "latest").is_file():
        p = p / (p / "latest").read_text().strip()
    if not is_torch_dist_checkpoint(p):
        raise CheckpointError(
            f"{path}: not a torch_dist checkpoint (no .metadata and metadata.json; or a branch "
            f"directory with a 'latest' file)"
        )
    return p


def model_from_meta(meta: dict[str, Any], where: str) -> ModelConfig:
    model = meta.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{where}: copd_meta.json has no model config ('model')")
    try:
        return from_dict(ModelConfig, model)
    except ConfigError as e:
        raise CheckpointError(f"{where}: copd_meta.json model config: {e}") from None


def detect_prefix(reader, prefix: str | None) -> str:
    """The key prefix of the model's tensors (``model.``; another one with ``--prefix``).
    Optimizer state (``optimizer.state.exp_avg.model.*`` ...) is never a candidate."""
    found = sorted({k[: -len(EMBEDDING)] for k in reader.tensor_keys()
                    if k.endswith(EMBEDDING) and not k.startswith("optimizer.")})
    if prefix is not None:
        if prefix not in found:
            raise CheckpointError(
                f"{reader.path}: no model under prefix {prefix!r} (found {found or 'none'})"
            )
        return prefix
    if not found:
        raise CheckpointError(f"{reader.path}: no language model weights (no '*{EMBEDDING}')")
    if len(found) > 1:
        raise CheckpointError(
            f"{reader.path}: holds several models (prefixes {found}); choose one with --prefix"
        )
    return found[0]


def resolve_keys(reader, maps: mp.ModelMapping, prefix: str, skip: tuple[str, ...]) -> dict:
    """ParamMap.mcore -> the key present in the checkpoint; shapes checked; every tensor under
    ``prefix`` accounted for (``skip``: sub-prefixes deliberately left out)."""
    keys: dict[str, str] = {}
    stored = set(reader.tensor_keys())
    for p in maps.params:
        for candidate in (p.mcore, *p.alt_mcore):
            if prefix + candidate in stored:
                keys[p.mcore] = prefix + candidate
                break
        else:
            raise CheckpointError(
                f"{reader.path}: tensor {prefix + p.mcore!r} is missing (copd_meta.json's model "
                f"config implies it)"
            )
        shape = reader.info(keys[p.mcore]).shape
        if tuple(shape) != p.stored_shape:
            raise CheckpointError(
                f"{reader.path}: tensor {keys[p.mcore]!r} has shape {list(shape)}, but "
                f"copd_meta.json's model config implies {list(p.stored_shape)}"
            )
    used = set(keys.values())
    unknown = [
        k for k in reader.tensor_keys()
        if k.startswith(prefix) and k not in used
        and not any(k.startswith(prefix + s) for s in skip)
    ]
    if unknown:
        raise CheckpointError(
            f"{reader.path}: tensor {min(unknown)!r} has no Hugging Face counterpart "
            f"(the model config and the weights disagree, or the model is not supported)"
        )
    return keys


def resolve_tokenizer(tokenizer: str | os.PathLike | None, ckpt: Path, meta: dict) -> Path:
    if tokenizer is not None:
        path = Path(tokenizer)
    elif isinstance(meta.get("tokenizer"), str):
        path = ckpt / meta["tokenizer"]
    elif (ckpt / "tokenizer").is_dir():
        path = ckpt / "tokenizer"
    else:
        raise CheckpointError(
            f"{ckpt}: no tokenizer recorded with the checkpoint; pass --tokenizer DIR (the run's "
            f"data.tokenizer, or the toy tokenizer directory)"
        )
    if not path.is_dir():
        raise CheckpointError(f"{path}: tokenizer directory not found")
    return path


def convert_to_hf(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    with_tokenizer: bool = True,
    dtype: torch.dtype | None = None,
    text_only: bool = False,
    prefix: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    workers: int = 4,
    overwrite: bool = False,
) -> ExportResult:
    """Export ``checkpoint`` to an HF model directory ``output`` (see the module doc)."""
    from megatron_copd.checkpoint.torch_dist_io import TorchDistReader

    t0 = time.perf_counter()
    output = Path(output)
    if output.exists() and not overwrite:
        raise CheckpointError(f"{output}: output already exists (pass --overwrite to replace it)")
    ckpt_dir = resolve_checkpoint(checkpoint)
    with TorchDistReader(ckpt_dir) as reader:
        meta = reader.meta
        model = model_from_meta(meta, str(ckpt_dir))
        skip: tuple[str, ...] = ()
        if text_only:
            model, skip = families.text_only(model)
        where = f"{ckpt_dir / 'copd_meta.json'}: model"
        families.check_exportable(model, where)
        prefix = detect_prefix(reader, prefix)
        maps = families.export_maps(model)
        keys = resolve_keys(reader, maps, prefix, skip)
        out_dtype = dtype or reader.info(keys[maps.params[0].mcore]).dtype
        if not with_tokenizer and families.needs_image_token(model):
            raise CheckpointError(f"{ckpt_dir}: a VLM export needs the tokenizer (its image token)")
        tok_src = resolve_tokenizer(tokenizer, ckpt_dir, meta) if with_tokenizer else None

        entries = []
        for p in maps.params:
            for layer in range(p.layers) if p.layers else [None]:
                entries += [(n, s, out_dtype) for n, s in zip(p.hf_names(layer), p.hf_shapes())]
        entries += [(c.name, c.shape, out_dtype) for c in maps.constants]
        plan = plan_shards(entries, max_shard_bytes)

        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            tok = export_tokenizer(tok_src, tmp) if tok_src else TokenizerInfo("none", *[None] * 3)
            if families.needs_image_token(model) and tok.image_token_id is None:
                raise CheckpointError(f"{tok_src}: the tokenizer has no image token")
            tokens = SpecialTokens(tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                                   tok.image_token_id)
            config = families.export_config(model, out_dtype, tokens)
            writer = ShardWriter(tmp, plan)
            try:
                items = _work_items(maps, keys, reader, block_bytes)
                with ThreadPoolExecutor(max(1, workers)) as pool:
                    for _ in pool.map(lambda it: _run(it, reader, writer, out_dtype), items):
                        pass
                for c in maps.constants:
                    writer.write(c.name, torch.full(c.shape, c.value, dtype=out_dtype))
                writer.finish()
            finally:
                writer.close()
            _write_json(tmp / INDEX_FILE, plan.index())
            _write_json(tmp / "config.json", config)
            _write_json(tmp / "generation_config.json", generation_config(tokens))
            if model.vision is not None:
                _write_processor(tmp, model, tok.image_token)
            if model.qwen_vl is not None:
                families.write_processor_files(tok_src, tmp, model)
            _publish(tmp, output, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return ExportResult(
        output=output,
        architecture=config["architectures"][0],
        tensors=len(plan.slots),
        shards=len(plan.files),
        bytes_written=writer.bytes_written,
        seconds=time.perf_counter() - t0,
    )


@dataclass(frozen=True)
class _Item:
    param: mp.ParamMap
    key: str
    layer: int | None = None
    rows: tuple[int, int] | None = None


def _work_items(maps: mp.ModelMapping, keys: dict, reader, block_bytes: int):
    for p in maps.params:
        key = keys[p.mcore]
        if p.layers:
            for layer in range(p.layers):
                yield _Item(p, key, layer=layer)
            continue
        row_bytes = reader.info(key).dtype.itemsize * _numel(p.shape[1:])
        rows = p.shape[0] if p.shape else 0
        if p.op is mp.COPY and len(p.shape) >= 1 and rows * row_bytes > block_bytes:
            step = max(1, block_bytes // max(1, row_bytes))
            for start in range(0, rows, step):
                yield _Item(p, key, rows=(start, min(rows, start + step) - start))
        else:
            yield _Item(p, key)


def _run(item: _Item, reader, writer: ShardWriter, dtype: torch.dtype) -> None:
    p = item.param
    if item.layer is not None:
        zeros = (0,) * len(p.shape)
        t = reader.read(item.key, (item.layer, *zeros), (1, *p.shape))[0]
        names = p.hf_names(item.layer)
    elif item.rows is not None:
        start, n = item.rows
        t = reader.read(item.key, (start,) + (0,) * (len(p.shape) - 1), (n, *p.shape[1:]))
        row_bytes = dtype.itemsize * _numel(p.shape[1:])
        writer.write(p.hf_names(None)[0], t.to(dtype), start * row_bytes)
        return
    else:
        t = reader.read(item.key)
        names = p.hf_names(None)
    for name, part in zip(names, p.to_hf(t)):
        writer.write(name, part.to(dtype))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_processor(d: Path, model: ModelConfig, image_token: str | None) -> None:
    from megatron_copd.data.media import IMAGE_MEAN, IMAGE_STD

    v = model.vision
    _write_json(d / "preprocessor_config.json", {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": v.image_size, "width": v.image_size},
        "resample": 3,  # bicubic, as megatron_copd.data.media resizes
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
    })
    _write_json(d / "processor_config.json", {
        "processor_class": "LlavaProcessor",
        "patch_size": v.patch_size,
        "vision_feature_select_strategy": "full",
        "num_additional_image_tokens": 1 if v.class_token else 0,
        "image_token": image_token or "<image>",
    })


def _publish(tmp: Path, output: Path, overwrite: bool) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    old = None
    if output.exists():
        if not overwrite:
            raise CheckpointError(f"{output}: output already exists (pass --overwrite)")
        old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
