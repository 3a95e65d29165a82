"""Hugging Face safetensors checkpoints: a lazy reader over (sharded) directories and a streaming
shard writer.

Reading parses the (simple, documented) safetensors layout itself and ``pread``s a tensor or a
row range into a fresh tensor only when asked for — no memory map, so a converter's memory is
what it holds, not the pages of every shard it touched. Writing lays out every shard before any data exists: the safetensors
header only needs names, dtypes and shapes, so each shard's header is written first and tensor
bytes are then written at their known offsets (``os.pwrite``), in any order and from several
threads, one piece at a time — memory stays at the pieces in flight, whatever the model size.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_copd.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


# -- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredTensor:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset of the data in the file."""
    nbytes: int


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensor index of one safetensors file (8-byte length, JSON header, data)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("file shorter than its header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    base = 8 + n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = ST_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype "
                                  f"{entry.get('dtype')!r}")
        begin, stop = entry["data_offsets"]
        shape = tuple(int(x) for x in entry["shape"])
        if stop - begin != _numel(shape) * dtype.itemsize or base + stop > size:
            raise CheckpointError(f"{path}: tensor {name!r} is truncated or inconsistent")
        out[name] = StoredTensor(path.name, dtype, shape, base + begin, stop - begin)
    return out


class HFCheckpoint:
    """The weights of an HF model directory (``model.safetensors`` or an index + shards).

    Tensors are read with ``pread`` straight into fresh tensors (no memory map, so memory is what
    the caller holds); thread-safe.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: Hugging Face model directory not found")
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            counts: dict[str, int] = {}
            for f in weight_map.values():
                counts[f] = counts.get(f, 0) + 1
            for f, n in sorted(counts.items()):
                if not (self.path / f).is_file():
                    raise CheckpointError(
                        f"{self.path / f}: missing shard (listed in {INDEX_FILE} for {n} tensors)"
                    )
            files = sorted(counts)
        elif (self.path / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            found = sorted(p.name for p in self.path.glob("*.bin")) + sorted(
                p.name for p in self.path.glob("*.pt*")
            )
            hint = f" (found {found[:3]}: only safetensors weights are supported)" if found else ""
            raise CheckpointError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self.tensors: dict[str, StoredTensor] = {}
        for f in files:
            for name, st in read_header(self.path / f).items():
                if weight_map is not None and weight_map.get(name) != f:
                    continue  # the index decides which copy counts
                self.tensors[name] = st
        for name, f in (weight_map or {}).items():
            if name not in self.tensors:
                raise CheckpointError(
                    f"{self.path / f}: tensor {name!r} listed in {INDEX_FILE} is not in this shard"
                )
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def _info(self, name: str) -> StoredTensor:
        st = self.tensors.get(name)
        if st is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} not found")
        return st

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._info(name).dtype

    def get(self, name: str) -> torch.Tensor:
        st = self._info(name)
        return self._read(st, st.start, st.shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        st = self._info(name)
        row = _numel(st.shape[1:]) * st.dtype.itemsize
        return self._read(st, st.start + start * row, (stop - start, *st.shape[1:]))

    def _read(self, st: StoredTensor, offset: int, shape: tuple[int, ...]) -> torch.Tensor:
        out = torch.empty(shape, dtype=st.dtype)
        if out.numel() == 0:
            return out
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        fd, done = self._fd(st.file), 0
        while done < view.nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{self.path / st.file}: truncated shard")
            done += n
        return out

    def _fd(self, file: str) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(self.path / file, os.O_RDONLY)
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# -- writing ------------------------------------------------------------------------------------


@dataclass
class TensorSlot:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str = ""
    start: int = 0
    """Absolute byte offset of the tensor's data in its file."""

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


@dataclass
class ShardPlan:
    """Which tensor goes where; built from the full list of (name, shape, dtype) up front."""

    slots: dict[str, TensorSlot]
    files: list[str]
    headers: dict[str, bytes] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.slots.values())

    def index(self) -> dict:
        return {"metadata": {"total_size": self.total_size},
                "weight_map": {n: s.file for n, s in self.slots.items()}}


def plan_shards(
    tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int
) -> ShardPlan:
    """Pack tensors, in the given order, into shards of at most ``max_shard_bytes`` of data
    (a larger tensor gets a shard of its own). Files are ``model-0000k-of-0000n.safetensors``."""
    groups: list[list[TensorSlot]] = [[]]
    used = 0
    slots: dict[str, TensorSlot] = {}
    for name, shape, dtype in tensors:
        if name in slots:
            raise ValueError(f"tensor {name!r} planned twice")
        if dtype not in ST_NAMES:
            raise CheckpointError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        slot = TensorSlot(name, tuple(shape), dtype)
        if groups[-1] and used + slot.nbytes > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(slot)
        used += slot.nbytes
        slots[name] = slot
    n = len(groups)
    plan = ShardPlan(slots, [])
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        plan.files.append(file)
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for s in group:
            header[s.name] = {"dtype": ST_NAMES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        data_start = 8 + len(raw)
        for s in group:
            s.file = file
            s.start = data_start + header[s.name]["data_offsets"][0]
        plan.headers[file] = struct.pack("<Q", len(raw)) + raw
        plan.sizes[file] = data_start + offset
    return plan


class ShardWriter:
    """Writes the planned shards into ``directory``: headers now, tensor bytes as they come.

    ``write(name, part, offset_bytes)`` stores a contiguous piece of a tensor (row-major) at
    ``offset_bytes`` into that tensor's data; thread-safe. ``finish()`` checks that every byte
    was written and syncs the files.
    """

    def __init__(self, directory: str | os.PathLike, plan: ShardPlan) -> None:
        self.dir = Path(directory)
        self.plan = plan
        self._fds: dict[str, int] = {}
        self._written: dict[str, int] = {n: 0 for n in plan.slots}
        self._lock = threading.Lock()
        for file in plan.files:
            fd = os.open(self.dir / file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[file] = fd
            os.pwrite(fd, plan.headers[file], 0)
            os.ftruncate(fd, plan.sizes[file])
        self.bytes_written = 0

    def write(self, name: str, part: torch.Tensor, offset_bytes: int = 0) -> None:
        slot = self.plan.slots[name]
        if part.dtype != slot.dtype:
            raise ValueError(f"{name}: got {part.dtype}, planned {slot.dtype}")
        data = part.contiguous().view(-1).view(torch.uint8).numpy()
        if offset_bytes + data.nbytes > slot.nbytes:
            raise ValueError(f"{name}: piece at {offset_bytes} overruns the tensor")
        fd, pos, view = self._fds[slot.file], slot.start + offset_bytes, memoryview(data)
        while view.nbytes:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n
        with self._lock:
            self._written[name] += data.nbytes
            self.bytes_written += data.nbytes

    def finish(self) -> None:
        for name, slot in self.plan.slots.items():
            if self._written[name] != slot.nbytes:
                raise CheckpointError(
                    f"{self.dir}: tensor {name!r} incomplete ({self._written[name]} of "
                    f"{slot.nbytes} bytes written)"
                )
        for fd in self._fds.values():
            os.fsync(fd)
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
