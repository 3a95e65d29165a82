"""Find the raw bytes of one tensor chunk inside a torch_dist data file, without torch.load.

torch DCP stores each tensor chunk as a ``torch.save`` zip archive appended to a ``.distcp``
file. Its ``data/<key>`` record is stored uncompressed, so once we know where that record starts
and how the pickled tensor views it (storage offset, size, stride), any contiguous region of the
chunk can be read straight from the file into a tensor — no full-chunk load, no extra copy. That
is what keeps the merger and the converter bounded in memory whatever the chunk size.

:func:`locate_chunk` returns ``None`` for anything it does not recognise (a non-contiguous view,
an unknown pickle); callers then fall back to ``torch.load`` of the whole chunk.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass

import torch

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # zip local file header, 30 bytes
_LOCAL_HEADER_MAGIC = 0x04034B50


def _storage_dtypes() -> dict[str, torch.dtype]:
    """Legacy storage class names used in tensor pickles ('FloatStorage', ...) -> dtype."""
    out = {}
    with warnings.catch_warnings():  # touching the legacy TypedStorage classes warns
        warnings.simplefilter("ignore")
        for name in dir(torch):
            dtype = (
                getattr(getattr(torch, name), "dtype", None) if name.endswith("Storage") else None
            )
            if isinstance(dtype, torch.dtype):
                out[name] = dtype
    return out


_STORAGE_DTYPES = _storage_dtypes()


@dataclass(frozen=True)
class ChunkLocation:
    """The chunk's elements lie C-contiguously at ``data_offset`` (absolute, in the file)."""

    data_offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class FileSlice(io.RawIOBase):
    """A read-only, seekable view of ``[offset, offset + length)`` of an open file descriptor.

    Uses ``os.pread``, so many threads can share one descriptor without locking.
    """

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self._fd, self._offset, self._length, self._pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self._length - self._pos))
        got = os.preadv(self._fd, [view[:n]], self._offset + self._pos) if n else 0
        self._pos += got
        return got


class _TensorPickle(pickle.Unpickler):
    """Decodes the ``data.pkl`` of a ``torch.save``'d plain tensor into its view parameters.

    Only the handful of globals a plain tensor pickle uses are resolved; anything else raises,
    and the caller falls back to ``torch.load``.
    """

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_view
        if module == "collections" and name == "OrderedDict":
            return dict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

    def persistent_load(self, pid):
        typename, dtype, key, _location, numel = pid
        if typename != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return (dtype, str(key), int(numel))


def _rebuild_view(storage, storage_offset, size, stride, *_rest):
    return storage, int(storage_offset), tuple(size), tuple(stride)


def _is_c_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for size, st in zip(reversed(shape), reversed(stride)):
        if size != 1 and st != expected:
            return False
        expected *= size
    return True


def locate_chunk(fd: int, offset: int, length: int) -> ChunkLocation | None:
    """Parse the ``torch.save`` archive at ``[offset, offset + length)`` of ``fd``.

    Members are read raw through their local headers (not ``ZipFile.read``): archives written
    with ``torch.serialization.set_crc32_options(False)`` carry no CRC, which torch.load accepts.
    """
    try:
        with zipfile.ZipFile(FileSlice(fd, offset, length)) as zf:
            pkl = next((i for i in zf.infolist() if i.filename.endswith("/data.pkl")), None)
            if pkl is None or pkl.compress_type != zipfile.ZIP_STORED:
                return None
            pickled = os.pread(fd, pkl.file_size, offset + _member_start(fd, offset, pkl))
            (dtype, key, numel), storage_offset, shape, stride = _TensorPickle(
                io.BytesIO(pickled)
            ).load()
            record = zf.getinfo(pkl.filename[: -len("data.pkl")] + "data/" + key)
            data_start = _member_start(fd, offset, record)
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError):
        return None
    itemsize = dtype.itemsize
    if record.compress_type != zipfile.ZIP_STORED or record.file_size != numel * itemsize:
        return None
    view_numel = 1
    for s in shape:
        view_numel *= s
    if not _is_c_contiguous(shape, stride) or storage_offset + view_numel > numel:
        return None
    if data_start + record.file_size > length:
        return None
    return ChunkLocation(offset + data_start + storage_offset * itemsize, dtype, shape)


def _member_start(fd: int, offset: int, info: zipfile.ZipInfo) -> int:
    """Offset (within the archive) of a member's data, from its local file header."""
    header = os.pread(fd, _LOCAL_HEADER.size, offset + info.header_offset)
    if len(header) != _LOCAL_HEADER.size:
        raise ValueError("short local header")
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != _LOCAL_HEADER_MAGIC:
        raise ValueError("bad local header")
    return info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
