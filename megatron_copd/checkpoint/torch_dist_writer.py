"""Write a megatron torch_dist checkpoint chunk by chunk, without a model or a process group.

The output is what ``dist_checkpointing.save`` would write: ``__<i>_0.distcp`` data files whose
entries are ``torch.save`` archives (tensors chunk by chunk, non-tensor entries as raw bytes),
the pickled DCP index ``.metadata``, megatron's ``metadata.json`` and ``copd_meta.json``. It loads
with ``dist_checkpointing.load`` at any TP/PP because keys and chunk boxes are global.

Everything is written under ``<out>.tmp`` and renamed to ``<out>`` only by :meth:`commit`, after
every file is fsynced; an interrupted writer never leaves a directory that looks complete.

    with TorchDistWriter(out, num_files=4) as w:
        w.declare_tensor("model.x", (1024, 64), torch.bfloat16)
        w.write_chunk("model.x", (0, 0), top_half, file_index=0)      # thread-safe per file
        w.write_chunk("model.x", (512, 0), bottom_half, file_index=1)
        w.write_common_state({})
        w.meta = {...}
        w.commit()
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from megatron_copd.checkpoint import regions
from megatron_copd.checkpoint.meta import write_meta
from megatron_copd.errors import CheckpointError

DCP_VERSION = "1.0.0"
COMMON_STATE_KEY = "common_state/shard_0_1"
MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}


WRITEBACK_BYTES = 64 << 20


class _NoCrc:
    """While any writer is open, ``torch.save`` skips the zip CRC-32 of its records: computing
    it costs more than writing the bytes, and ``torch.load`` (so DCP and megatron) never checks
    it. A process-wide torch setting, restored when the last writer closes."""

    _lock = threading.Lock()
    _users = 0
    _saved = True

    @classmethod
    def acquire(cls) -> None:
        with cls._lock:
            if cls._users == 0:
                cls._saved = torch.serialization.get_crc32_options()
                torch.serialization.set_crc32_options(False)
            cls._users += 1

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users == 0:
                torch.serialization.set_crc32_options(cls._saved)


class TorchDistWriter:
    """See the module docstring. ``num_files`` data files; each has its own lock, so one writer
    thread per file never waits on another."""

    def __init__(
        self, path: str | os.PathLike, *, overwrite: bool = False, num_files: int = 1
    ) -> None:
        self.final = Path(path)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        if self.final.exists() and not overwrite:
            raise CheckpointError(
                f"{self.final}: output already exists (pass --overwrite to replace it)"
            )
        if num_files < 1:
            raise ValueError("num_files must be >= 1")
        self.overwrite = overwrite
        shutil.rmtree(self.tmp, ignore_errors=True)  # leftover of an interrupted earlier write
        self.tmp.mkdir(parents=True)
        self._names = [f"__{i}_0.distcp" for i in range(num_files)]
        self._files: list[io.FileIO | None] = [None] * num_files
        self._locks = [threading.Lock() for _ in range(num_files)]
        self._unsynced = [0] * num_files  # where each file's not-yet-flushed bytes start
        self._index_lock = threading.Lock()
        self._tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._chunks: dict[str, list[ChunkStorageMetadata]] = {}
        self._bytes: list[str] = []
        self._storage: dict[MetadataIndex, _StorageInfo] = {}
        self.meta: dict[str, Any] | None = None
        self.bytes_written = 0
        self._done = False
        _NoCrc.acquire()

    # -- entries ------------------------------------------------------------------------------

    def declare_tensor(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        with self._index_lock:
            if key in self._tensors or key in self._bytes:
                raise CheckpointError(f"{self.final}: key {key!r} written twice")
            self._tensors[key] = (tuple(int(s) for s in shape), dtype)
            self._chunks[key] = []

    def write_chunk(
        self, key: str, offsets: tuple[int, ...], tensor: torch.Tensor, file_index: int = 0
    ) -> None:
        """Store ``tensor`` as the box of ``key`` starting at ``offsets``."""
        shape, dtype = self._tensors.get(key, (None, None))
        if shape is None:
            raise CheckpointError(f"{self.final}: tensor {key!r} was not declared")
        offsets, sizes = tuple(int(o) for o in offsets), tuple(tensor.shape)
        if (
            tensor.dtype != dtype
            or len(offsets) != len(shape)
            or any(o < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape))
        ):
            raise CheckpointError(
                f"{self.final}: chunk {tensor.dtype} {list(sizes)} at {list(offsets)} does not fit "
                f"{key!r} ({dtype} {list(shape)})"
            )
        info = self._append(file_index, lambda f: torch.save(_exact_storage(tensor), f))
        with self._index_lock:
            index = MetadataIndex(key, torch.Size(offsets))
            if index in self._storage:
                raise CheckpointError(
                    f"{self.final}: chunk of {key!r} at {list(offsets)} written twice"
                )
            self._storage[index] = info
            self._chunks[key].append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))

    def write_bytes(self, key: str, data: bytes, file_index: int = 0) -> None:
        """A non-tensor entry, stored as is (already a ``torch.save`` archive)."""
        with self._index_lock:
            if key in self._tensors or key in self._bytes:
                raise CheckpointError(f"{self.final}: key {key!r} written twice")
            self._bytes.append(key)
        info = self._append(file_index, lambda f: f.write(data))
        with self._index_lock:
            self._storage[MetadataIndex(key)] = info

    def write_object(self, key: str, obj: Any, file_index: int = 0) -> None:
        """A megatron ShardedObject entry (``key`` is its unique key, e.g.
        ``model.decoder.layers.mlp.linear_fc1._extra_state/shard_0_4``)."""
        buf = io.BytesIO()
        torch.save([obj], buf)  # megatron stores a list of the objects of one unique key
        self.write_bytes(key, buf.getvalue(), file_index)

    def write_common_state(self, state: dict, file_index: int = 0) -> None:
        """Megatron's non-sharded state (what ``load`` merges into the returned state dict)."""
        self.write_object(COMMON_STATE_KEY, state, file_index)

    def _append(self, file_index: int, write) -> _StorageInfo:
        with self._locks[file_index]:
            f = self._files[file_index]
            if f is None:
                f = self._files[file_index] = open(
                    self.tmp / self._names[file_index], "wb", buffering=0
                )
            start = f.tell()
            write(f)
            length = f.tell() - start
            self._start_writeback(file_index, f)
        with self._index_lock:
            self.bytes_written += length
        return _StorageInfo(self._names[file_index], start, length)

    def _start_writeback(self, file_index: int, f: io.FileIO) -> None:
        """Hand every WRITEBACK_BYTES written to the disk now (POSIX_FADV_DONTNEED starts an
        asynchronous writeback of the range on Linux, and drops pages already clean): the disk
        writes while the caller computes, instead of all at the final fsync, and a checkpoint
        larger than the page cache does not evict everything else. Caller holds the file's lock."""
        end = f.tell()
        begin = self._unsynced[file_index]
        if end - begin >= WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), begin, end - begin, os.POSIX_FADV_DONTNEED)
            self._unsynced[file_index] = end

    # -- finishing ----------------------------------------------------------------------------

    def commit(self) -> Path:
        """Check coverage, write the indexes, fsync, and atomically publish ``<out>``."""
        for key, (shape, _) in self._tensors.items():
            covered = sum(regions.numel(tuple(c.sizes)) for c in self._chunks[key])
            if covered != regions.numel(shape):
                raise CheckpointError(
                    f"{self.final}: tensor {key!r} incomplete ({covered} of "
                    f"{regions.numel(shape)} elements written)"
                )
        for i, f in enumerate(self._files):
            if f is not None:
                os.fsync(f.fileno())
                f.close()
                self._files[i] = None
        state_md: dict[str, Any] = {}
        for key, (shape, dtype) in self._tensors.items():
            state_md[key] = TensorStorageMetadata(
                TensorProperties(dtype=dtype), torch.Size(shape), self._chunks[key]
            )
        for key in self._bytes:
            state_md[key] = BytesStorageMetadata()
        md = Metadata(
            state_dict_metadata=state_md,
            storage_data=self._storage,
            storage_meta=StorageMeta(checkpoint_id=str(self.final), save_id=str(uuid.uuid4())),
            version=DCP_VERSION,
        )
        _write_synced(self.tmp / "metadata.json", json.dumps(MEGATRON_METADATA).encode())
        if self.meta is not None:
            write_meta(self.tmp, self.meta)
            _fsync_path(self.tmp / "copd_meta.json")
        _write_synced(self.tmp / ".metadata", pickle.dumps(md))  # last: marks the data complete
        _fsync_path(self.tmp)
        self._publish()
        self._finish()
        return self.final

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            _NoCrc.release()

    def _publish(self) -> None:
        old = None
        if self.final.exists():
            if not self.overwrite:
                raise CheckpointError(
                    f"{self.final}: output already exists (pass --overwrite to replace it)"
                )
            # Move the old output aside first: at every instant <out> is either the complete
            # old checkpoint, absent, or the complete new one.
            old = self.final.with_name(f"{self.final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        _fsync_path(self.final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Drop everything written so far (idempotent)."""
        for i, f in enumerate(self._files):
            if f is not None:
                f.close()
                self._files[i] = None
        if not self._done:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._finish()

    def __enter__(self) -> "TorchDistWriter":
        return self

    def __exit__(self, *exc) -> None:
        # Leaving the block without commit() (an exception, a forgotten commit) discards it.
        if not self._done:
            self.abort()


def _exact_storage(t: torch.Tensor) -> torch.Tensor:
    """``torch.save`` writes a tensor's whole storage; give it one holding exactly ``t``."""
    if not t.is_contiguous():
        return t.contiguous()
    storage = t.untyped_storage()
    start = t.storage_offset() * t.element_size()
    if start == 0 and storage.nbytes() == t.nbytes:
        return t
    sliced = storage[start : start + t.nbytes]  # shares memory, no copy
    return torch.empty(0, dtype=t.dtype).set_(sliced, 0, t.shape)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
