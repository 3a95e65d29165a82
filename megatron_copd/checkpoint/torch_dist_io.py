"""Read megatron torch_dist checkpoints without a model or a process group.

A torch_dist directory holds ``.metadata`` (torch DCP's pickled index: every key's global shape,
dtype and chunk boxes, and where each chunk lies), ``__<rank>_<k>.distcp`` data files,
``metadata.json`` (megatron's backend marker) and this project's ``copd_meta.json``. Tensors are
stored at their global shape, independent of the TP/PP layout that saved them, so any region of
any tensor can be read here from whatever chunks overlap it, straight from the data files (see
``chunk_locator``). Non-tensor entries (megatron's ``common_state`` and the modules'
``_extra_state``) are opaque byte strings.

    with TorchDistReader(path) as r:
        for key in r.tensor_keys():
            w = r.read(key)                                # whole tensor
            top = r.read(key, (0, 0), (16, r.info(key).shape[1]))  # a region

The writer lives in ``torch_dist_writer`` and is re-exported here.
"""

from __future__ import annotations

import functools
import io
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)

from megatron_copd.checkpoint import regions
from megatron_copd.checkpoint.chunk_locator import ChunkLocation, FileSlice, locate_chunk
from megatron_copd.checkpoint.meta import read_meta
from megatron_copd.errors import CheckpointError

__all__ = [
    "Chunk",
    "TensorInfo",
    "TorchDistReader",
    "TorchDistWriter",
    "COMMON_STATE_KEY",
    "is_torch_dist_checkpoint",
]

COMMON_STATE_KEY = "common_state/shard_0_1"
MEGATRON_METADATA_FILE = "metadata.json"
DCP_METADATA_FILE = ".metadata"


@dataclass(frozen=True)
class Chunk:
    """One stored box of a tensor and where its ``torch.save`` archive lies."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[Chunk, ...]

    @property
    def numel(self) -> int:
        return regions.numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def is_torch_dist_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / DCP_METADATA_FILE).is_file() and (p / MEGATRON_METADATA_FILE).is_file()


class TorchDistReader:
    """Random access to the tensors and byte entries of one torch_dist checkpoint.

    Opening validates the index: every data file exists and is long enough, every tensor's
    chunks tile it. Reads are thread-safe (``os.pread`` on shared descriptors).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.metadata = _read_metadata(self.path)
        self._tensors: dict[str, TensorInfo] = {}
        self._bytes: dict[str, Chunk] = {}
        try:
            self._index()
        except (AttributeError, TypeError, ValueError) as e:  # an index of the wrong shape
            raise CheckpointError(
                f"{self.path / DCP_METADATA_FILE}: corrupted metadata ({_first_line(e)})"
            ) from None
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        self._locations: dict[tuple[str, int], ChunkLocation | None] = {}
        self._loaded: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._loaded_lock = threading.Lock()
        self._meta: dict[str, Any] | None = None

    # -- index --------------------------------------------------------------------------------

    def _index(self) -> None:
        storage = self.metadata.storage_data or {}
        by_key: dict[str, dict] = {}
        for index, info in storage.items():
            offs = None if index.offset is None else tuple(int(o) for o in index.offset)
            by_key.setdefault(index.fqn, {})[offs] = info
        file_end: dict[str, int] = {}
        for key, md in self.metadata.state_dict_metadata.items():
            stored = by_key.get(key, {})
            if isinstance(md, BytesStorageMetadata):
                info = stored.get(None)
                if info is None:
                    raise CheckpointError(f"{self.path}: corrupted metadata: no data for {key!r}")
                self._bytes[key] = _chunk((), (), info)
                _note_end(file_end, info)
                continue
            if not isinstance(md, TensorStorageMetadata):
                raise CheckpointError(f"{self.path}: unsupported entry type for {key!r}")
            shape = tuple(int(s) for s in md.size)
            chunks = []
            for c in md.chunks:
                offs, sizes = tuple(int(o) for o in c.offsets), tuple(int(s) for s in c.sizes)
                info = stored.get(offs)
                if info is None:
                    raise CheckpointError(
                        f"{self.path}: corrupted metadata: no data for {key!r} chunk at {offs}"
                    )
                if getattr(info, "transform_descriptors", None):
                    raise CheckpointError(
                        f"{self.path}: {key!r} is stored with transforms "
                        f"{list(info.transform_descriptors)}; only plain torch_dist is supported"
                    )
                chunks.append(_chunk(offs, sizes, info))
                _note_end(file_end, info)
            if sum(regions.numel(c.sizes) for c in chunks) != regions.numel(shape):
                raise CheckpointError(
                    f"{self.path}: corrupted metadata: the chunks of {key!r} do not cover its "
                    f"shape {list(shape)}"
                )
            self._tensors[key] = TensorInfo(key, shape, md.properties.dtype, tuple(chunks))
        for name, end in sorted(file_end.items()):
            file = self.path / name
            if not file.is_file():
                raise CheckpointError(f"{self.path}: missing shard {name}")
            if file.stat().st_size < end:
                raise CheckpointError(
                    f"{file}: truncated shard ({file.stat().st_size} bytes, index needs {end})"
                )

    # -- keys and metadata --------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self.metadata.state_dict_metadata)

    def tensor_keys(self) -> list[str]:
        return list(self._tensors)

    def bytes_keys(self) -> list[str]:
        return list(self._bytes)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._tensors[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {key!r}") from None

    @property
    def meta(self) -> dict[str, Any]:
        """``copd_meta.json`` (model config, branch, base fingerprint ...)."""
        if self._meta is None:
            self._meta = read_meta(self.path)
        return self._meta

    @property
    def model_config(self) -> dict[str, Any]:
        model = self.meta.get("model")
        if not isinstance(model, dict):
            raise CheckpointError(f"{self.path}: copd_meta.json has no model config ('model')")
        return model

    @functools.cached_property
    def fingerprint(self) -> str:
        """``compute_fingerprint`` of this checkpoint (computed once)."""
        from megatron_copd.checkpoint.fingerprint import compute_fingerprint

        return compute_fingerprint(self)

    # -- reading ------------------------------------------------------------------------------

    def read(
        self,
        key: str,
        offsets: tuple[int, ...] | None = None,
        sizes: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """A whole tensor, or the box ``offsets``/``sizes`` of it, as a new CPU tensor."""
        info = self.info(key)
        offsets, sizes = self._check_box(info, offsets, sizes)
        return self.read_into(key, torch.empty(sizes, dtype=info.dtype), offsets)

    def read_into(
        self,
        key: str,
        out: torch.Tensor,
        offsets: tuple[int, ...] | None = None,
        scratch: "Scratch | None" = None,
    ) -> torch.Tensor:
        """Fill ``out`` (stored dtype) with the box of ``key`` at ``offsets`` of ``out``'s shape.

        Where a chunk's part is contiguous in ``out`` it is read straight from the file into
        ``out``; otherwise through ``scratch`` (or a temporary) and copied.
        """
        info = self.info(key)
        offsets, sizes = self._check_box(info, offsets, tuple(out.shape))
        if out.dtype != info.dtype:
            raise CheckpointError(f"{info.key}: stored as {info.dtype}, asked into {out.dtype}")
        for ci, chunk in enumerate(info.chunks):
            box = regions.intersect((offsets, sizes), (chunk.offsets, chunk.sizes))
            if box is not None:
                self._read_box_into(info, ci, box, out[regions.as_slices(box, offsets)], scratch)
        return out

    def prefetch(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> None:
        """Ask the kernel to start reading a region that will be read soon (POSIX_FADV_WILLNEED),
        so cold reads of several inputs overlap instead of queueing one by one."""
        info = self.info(key)
        item = info.dtype.itemsize
        for ci, chunk in enumerate(info.chunks):
            box = regions.intersect((offsets, sizes), (chunk.offsets, chunk.sizes))
            loc = self._location(info, ci) if box is not None else None
            if loc is None:
                continue
            local_start = tuple(o - c for o, c in zip(box[0], chunk.offsets))
            local_last = tuple(o + s - 1 for o, s in zip(local_start, box[1]))
            first = regions.linear_index(local_start, chunk.sizes)
            last = regions.linear_index(local_last, chunk.sizes)
            start = loc.data_offset + first * item
            os.posix_fadvise(
                self._fd(chunk.file), start, (last - first + 1) * item, os.POSIX_FADV_WILLNEED
            )

    def iter_region(
        self,
        key: str,
        offsets: tuple[int, ...],
        sizes: tuple[int, ...],
        scratch: "Scratch | None" = None,
    ) -> Iterator[tuple[regions.Box, torch.Tensor]]:
        """Yield ``(box, part)`` for every chunk overlapping the region: ``box`` in global
        coordinates, ``part`` its values (stored dtype). With ``scratch``, a part is a view into
        the scratch buffer, valid until the next part is requested."""
        info = self.info(key)
        offsets, sizes = self._check_box(info, offsets, sizes)
        for ci, chunk in enumerate(info.chunks):
            box = regions.intersect((offsets, sizes), (chunk.offsets, chunk.sizes))
            if box is None:
                continue
            n = regions.numel(box[1])
            buf = scratch.tensor(n, info.dtype) if scratch else torch.empty(n, dtype=info.dtype)
            part = buf.view(box[1])
            self._read_box_into(info, ci, box, part, None)
            yield box, part

    def read_bytes(self, key: str) -> bytes:
        """The raw bytes of a non-tensor entry (a ``torch.save`` archive)."""
        chunk = self._bytes.get(key)
        if chunk is None:
            raise CheckpointError(f"{self.path}: no non-tensor entry {key!r}")
        data = os.pread(self._fd(chunk.file), chunk.length, chunk.offset)
        if len(data) != chunk.length:
            raise CheckpointError(f"{self.path / chunk.file}: truncated shard reading {key!r}")
        return data

    def read_object(self, key: str) -> Any:
        """A non-tensor entry unpickled the way megatron does (``weights_only=True``)."""
        try:
            return torch.load(io.BytesIO(self.read_bytes(key)), weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad entry
            raise CheckpointError(
                f"{self.path}: cannot decode {key!r} ({_first_line(e)})"
            ) from None

    # -- internals ----------------------------------------------------------------------------

    @staticmethod
    def _check_box(info: TensorInfo, offsets, sizes) -> regions.Box:
        offsets = tuple(offsets) if offsets is not None else (0,) * len(info.shape)
        sizes = (
            tuple(sizes) if sizes is not None else tuple(s - o for s, o in zip(info.shape, offsets))
        )
        if (
            len(offsets) != len(info.shape)
            or len(sizes) != len(info.shape)
            or any(o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, info.shape))
        ):
            raise CheckpointError(
                f"{info.key}: region offsets {list(offsets)} sizes {list(sizes)} outside "
                f"shape {list(info.shape)}"
            )
        return offsets, sizes

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            with self._fd_lock:
                fd = self._fds.get(name)
                if fd is None:
                    fd = os.open(self.path / name, os.O_RDONLY)
                    self._fds[name] = fd
        return fd

    def _location(self, info: TensorInfo, ci: int) -> ChunkLocation | None:
        cache_key = (info.key, ci)
        if cache_key not in self._locations:
            c = info.chunks[ci]
            loc = locate_chunk(self._fd(c.file), c.offset, c.length)
            if loc is not None and (loc.dtype != info.dtype or loc.shape != c.sizes):
                loc = None
            self._locations[cache_key] = loc
        return self._locations[cache_key]

    def _read_box_into(
        self,
        info: TensorInfo,
        ci: int,
        box: regions.Box,
        dst: torch.Tensor,
        scratch: "Scratch | None",
    ) -> None:
        chunk = info.chunks[ci]
        local = (tuple(o - c for o, c in zip(box[0], chunk.offsets)), box[1])
        loc = self._location(info, ci)
        if loc is None:  # unusual archive: load the whole chunk once, then slice
            dst.copy_(self._loaded_chunk(info, ci)[regions.as_slices(local, (0,) * len(box[0]))])
            return
        fd, item = self._fd(chunk.file), info.dtype.itemsize
        if regions.is_contiguous_in(local, chunk.sizes):
            start = loc.data_offset + regions.linear_index(local[0], chunk.sizes) * item
            if dst.is_contiguous():
                self._pread_into(fd, dst, start, info.key)
            else:
                n = regions.numel(box[1])
                tmp = scratch.tensor(n, info.dtype) if scratch else torch.empty(n, dtype=info.dtype)
                self._pread_into(fd, tmp, start, info.key)
                dst.copy_(tmp.view(box[1]))
            return
        for run in regions.contiguous_runs(local, chunk.sizes):  # arbitrary boxes (API reads)
            tmp = torch.empty(run[1], dtype=info.dtype)
            start = loc.data_offset + regions.linear_index(run[0], chunk.sizes) * item
            self._pread_into(fd, tmp, start, info.key)
            dst[regions.as_slices(run, local[0])].copy_(tmp)

    def _pread_into(self, fd: int, dst: torch.Tensor, offset: int, key: str) -> None:
        view = (
            memoryview(dst.view(-1).view(torch.uint8).numpy()) if dst.numel() else memoryview(b"")
        )
        want, done = view.nbytes, 0
        while done < want:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{self.path}: truncated shard reading {key!r}")
            done += got

    def _loaded_chunk(self, info: TensorInfo, ci: int) -> torch.Tensor:
        cache_key = (info.key, ci)
        with self._loaded_lock:
            if cache_key in self._loaded:
                self._loaded.move_to_end(cache_key)
                return self._loaded[cache_key]
        c = info.chunks[ci]
        try:
            t = torch.load(FileSlice(self._fd(c.file), c.offset, c.length), weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"{self.path / c.file}: corrupted chunk of {info.key!r} at {list(c.offsets)} "
                f"({_first_line(e)})"
            ) from None
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != c.sizes:
            raise CheckpointError(
                f"{self.path / c.file}: chunk of {info.key!r} at {list(c.offsets)} holds "
                f"{type(t).__name__} {list(getattr(t, 'shape', []))}, index says {list(c.sizes)}"
            )
        with self._loaded_lock:
            self._loaded[cache_key] = t
            while len(self._loaded) > 2:  # bounded: a region read touches few chunks at a time
                self._loaded.popitem(last=False)
        return t

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "TorchDistReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class Scratch:
    """A reusable, growing byte buffer handing out typed views (avoids page-faulting fresh
    memory for every chunk; one per worker thread)."""

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)

    def tensor(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = n * dtype.itemsize
        if self._buf.numel() < nbytes:
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf[:nbytes].view(dtype)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _chunk(offsets, sizes, info) -> Chunk:
    return Chunk(offsets, sizes, str(info.relative_path), int(info.offset), int(info.length))


def _note_end(file_end: dict[str, int], info) -> None:
    end = int(info.offset) + int(info.length)
    file_end[info.relative_path] = max(file_end.get(info.relative_path, 0), end)


def _read_metadata(path: Path) -> Metadata:
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    marker = path / MEGATRON_METADATA_FILE
    if not marker.is_file():
        raise CheckpointError(f"{path}: not a torch_dist checkpoint (no {MEGATRON_METADATA_FILE})")
    try:
        backend = json.loads(marker.read_text()).get("sharded_backend")
    except (json.JSONDecodeError, AttributeError):
        raise CheckpointError(f"{marker}: corrupted metadata (not a JSON object)") from None
    if backend != "torch_dist":
        raise CheckpointError(f"{marker}: sharded_backend is {backend!r}, expected 'torch_dist'")
    if not (path / DCP_METADATA_FILE).is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {DCP_METADATA_FILE})")
    try:
        md = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - pickle raises many types on garbage
        raise CheckpointError(
            f"{path / DCP_METADATA_FILE}: corrupted metadata ({type(e).__name__})"
        ) from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CheckpointError(f"{path / DCP_METADATA_FILE}: corrupted metadata (not a DCP index)")
    return md


from megatron_copd.checkpoint.torch_dist_writer import TorchDistWriter  # noqa: E402
