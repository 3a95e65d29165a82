"""Box arithmetic over global tensor coordinates (pure functions, no I/O).

A box is ``(offsets, sizes)``: the index range ``[offsets[d], offsets[d] + sizes[d])`` in every
dimension ``d``. Chunks of a torch_dist tensor are boxes of its global shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

Box = tuple[tuple[int, ...], tuple[int, ...]]


def numel(sizes: tuple[int, ...]) -> int:
    return math.prod(sizes)


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes, or None when they do not overlap."""
    offs, sizes = [], []
    for ao, asz, bo, bsz in zip(a[0], a[1], b[0], b[1]):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if hi <= lo:
            return None
        offs.append(lo)
        sizes.append(hi - lo)
    return tuple(offs), tuple(sizes)


def as_slices(box: Box, origin: tuple[int, ...]) -> tuple[slice, ...]:
    """Index a tensor that holds the box starting at ``origin`` with this sub-box."""
    return tuple(slice(o - g, o - g + s) for o, s, g in zip(box[0], box[1], origin))


def is_contiguous_in(local: Box, outer_sizes: tuple[int, ...]) -> bool:
    """True when the box (coordinates local to an array of ``outer_sizes``) is one C-contiguous
    run: single indices before some dim, a range in it, full extent after it."""
    d = next((i for i, s in enumerate(local[1]) if s != 1), len(local[1]))
    return all(
        local[0][i] == 0 and local[1][i] == outer_sizes[i] for i in range(d + 1, len(outer_sizes))
    )


def linear_index(index: tuple[int, ...], sizes: tuple[int, ...]) -> int:
    flat = 0
    for i, s in zip(index, sizes):
        flat = flat * s + i
    return flat


def contiguous_runs(local: Box, outer_sizes: tuple[int, ...]) -> Iterator[Box]:
    """Split a box (local coordinates) into C-contiguous sub-boxes, outermost dims first."""
    if is_contiguous_in(local, outer_sizes):
        yield local
        return
    d = next(i for i, s in enumerate(local[1]) if s != 1)
    for i in range(local[1][d]):
        offs = local[0][:d] + (local[0][d] + i,) + local[0][d + 1 :]
        sizes = local[1][:d] + (1,) + local[1][d + 1 :]
        yield from contiguous_runs((offs, sizes), outer_sizes)


def split_rows(shape: tuple[int, ...], itemsize: int, target_bytes: int) -> list[Box]:
    """Cut a tensor into boxes of about ``target_bytes`` that each span the FULL extent of every
    dimension after some dim ``d`` (single indices before it, a range in it).

    Such a box meets any chunk of any layout in one contiguous run of that chunk's storage: a
    chunk's extent in the trailing dims lies inside the box's, so the intersection is
    "single indices, a range, full chunk extent" — one read per (box, chunk).
    """
    if not shape:
        return [((), ())]
    if numel(shape) == 0:
        return [(tuple(0 for _ in shape), tuple(shape))]
    target = max(1, target_bytes // itemsize)
    # d: the outermost dim whose trailing block fits in the target.
    d = next((i for i in range(len(shape)) if numel(shape[i + 1 :]) <= target), len(shape) - 1)
    row = numel(shape[d + 1 :])
    step = max(1, target // row)
    boxes = []
    for outer in _indices(shape[:d]):
        for start in range(0, shape[d], step):
            n = min(step, shape[d] - start)
            boxes.append(
                (outer + (start,) + (0,) * (len(shape) - d - 1), (1,) * d + (n,) + shape[d + 1 :])
            )
    return boxes


def _indices(sizes: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    if not sizes:
        yield ()
        return
    for i in range(sizes[0]):
        for rest in _indices(sizes[1:]):
            yield (i,) + rest
