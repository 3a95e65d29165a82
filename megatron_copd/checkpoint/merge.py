"""Merge branch checkpoints (torch_dist) into one, streaming, at disk speed, in bounded memory.

    stats = merge_checkpoints([a, b], out)                                   # uniform average
    stats = merge_checkpoints([a, b, c], out, weights=[2, 1, 1], dtype="bf16")
    stats = merge_checkpoints([a, b], out, method="task_arithmetic", base=base, weights=[.7, .7])

average:          out = sum_k w_k * theta_k / sum_k w_k
task_arithmetic:  out = base + sum_k w_k * (theta_k - base)      (weights not normalised)

How: every output tensor is cut into pieces of about ``chunk_mb`` (fp32) that span the full
extent of their trailing dims (``regions.split_rows``), so each piece meets each stored chunk of
each input — whatever TP/PP saved it — in one contiguous run, read straight into a reusable
buffer. Pieces are accumulated in fp32 and written as chunks of the output by ``workers`` threads,
one output data file each (file reads and writes, and torch's kernels, release the GIL). Memory
is a few pieces per worker, independent of the model size.

By default only the model weights (``model.*``) go to the output, with the model part of
megatron's common state and the modules' ``_extra_state`` copied from the first input.
``include_optimizer`` merges every tensor (optimizer moments too) and copies all non-tensor state
from the first input.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_copd.checkpoint import merge_checks as checks
from megatron_copd.checkpoint import regions
from megatron_copd.checkpoint.torch_dist_io import (
    COMMON_STATE_KEY,
    Scratch,
    TorchDistReader,
    TorchDistWriter,
)
from megatron_copd.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_CHUNK_MB = 16


@dataclass
class MergeStats:
    output: Path
    method: str
    coefficients: list[float]
    """The factor applied to each input (normalised weights for average)."""
    base_fingerprint: str
    tensors: int
    pieces: int
    bytes_read: int
    bytes_written: int
    seconds: float

    @property
    def read_gbps(self) -> float:
        return self.bytes_read / max(self.seconds, 1e-9) / 1e9


@dataclass
class _Job:
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    out_dtype: torch.dtype


@dataclass
class _Plan:
    readers: list[TorchDistReader]
    base: TorchDistReader | None
    coefficients: list[float]
    jobs: list[_Job] = field(default_factory=list)


def merge_checkpoints(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    weights: Sequence[float] | None = None,
    method: str = "average",
    base: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    overwrite: bool = False,
    include_optimizer: bool = False,
    workers: int | None = None,
    chunk_mb: float = DEFAULT_CHUNK_MB,
    progress: bool = False,
) -> MergeStats:
    """Merge ``inputs`` into the torch_dist checkpoint ``output`` (see the module docstring).

    Raises ``UserError``/``CheckpointError`` with one line for anything that does not belong
    together; the output appears only when complete.
    """
    start = time.perf_counter()
    raw_weights = checks.check_arguments(inputs, output, weights, method, base)
    out_dtype = _parse_dtype(dtype)
    workers = workers or min(4, max(2, os.cpu_count() or 1))
    if workers < 1 or chunk_mb <= 0:
        raise UserError("--workers and --chunk-mb: expected positive numbers")
    output = Path(output)
    if output.exists() and not overwrite:
        raise UserError(f"--output: {output} already exists (pass --overwrite to replace it)")

    readers = [TorchDistReader(p) for p in inputs]
    base_reader = TorchDistReader(base) if base is not None else None
    everyone = readers + ([base_reader] if base_reader is not None else [])
    try:
        checks.check_same_model(everyone)
        fingerprint = checks.check_lineage(readers, base_reader)
        checks.check_same_keys(everyone, include_optimizer)
        tensor_keys, object_keys = checks.select_keys(readers[0], include_optimizer)
        dtypes = checks.resolve_dtype(readers, tensor_keys, out_dtype)
        checks.check_objects_compatible(readers, object_keys)
        if method == "average":
            total = sum(raw_weights)
            coefficients = [w / total for w in raw_weights]
        else:
            coefficients = list(raw_weights)
        plan = _Plan(readers, base_reader, coefficients)
        target = int(chunk_mb * 2**20)
        for key in tensor_keys:
            shape = readers[0].info(key).shape
            for offsets, sizes in regions.split_rows(shape, 4, target):
                plan.jobs.append(_Job(key, offsets, sizes, dtypes[key]))
        out_bytes = sum(
            regions.numel(readers[0].info(k).shape) * dtypes[k].itemsize for k in tensor_keys
        )
        _check_free_space(output, out_bytes)

        with TorchDistWriter(output, overwrite=overwrite, num_files=workers) as writer:
            for key in tensor_keys:
                writer.declare_tensor(key, readers[0].info(key).shape, dtypes[key])
            _copy_objects(readers[0], writer, object_keys, include_optimizer)
            bytes_read = _run_jobs(plan, writer, workers, out_bytes, progress)
            writer.meta = _output_meta(
                plan, fingerprint, method, raw_weights, base, include_optimizer
            )
            bytes_written = writer.bytes_written
            writer.commit()
    finally:
        for r in everyone:
            r.close()
    return MergeStats(
        output=output,
        method=method,
        coefficients=coefficients,
        base_fingerprint=fingerprint,
        tensors=len(tensor_keys),
        pieces=len(plan.jobs),
        bytes_read=bytes_read,
        bytes_written=bytes_written,
        seconds=time.perf_counter() - start,
    )


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"--dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _check_free_space(output: Path, needed: int) -> None:
    parent = output.resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed * 1.02 + 2**20:
        raise UserError(
            f"--output: {parent} has {free / 2**30:.1f} GiB free, the merge needs "
            f"{needed / 2**30:.1f} GiB"
        )


def _copy_objects(
    first: TorchDistReader, writer: TorchDistWriter, keys: list[str], include_optimizer: bool
) -> None:
    for key in keys:
        if key == COMMON_STATE_KEY and not include_optimizer:
            continue
        writer.write_bytes(key, first.read_bytes(key))
    if not include_optimizer:
        # megatron's load needs the common-state entry; keep only its model part
        writer.write_common_state(checks.weights_only_common_state(first) or {})


def _output_meta(plan: _Plan, fingerprint, method, raw_weights, base, include_optimizer) -> dict:
    meta = dict(plan.readers[0].meta)
    meta.update(
        branch="merged",
        base_fingerprint=fingerprint,
        merge={
            "method": method,
            "inputs": [{"path": str(r.path), "branch": r.meta.get("branch")} for r in plan.readers],
            "weights": list(raw_weights),
            "coefficients": plan.coefficients,
            "base": str(base) if base is not None else None,
            "include_optimizer": include_optimizer,
        },
    )
    return meta


# -- the streaming engine -------------------------------------------------------------------


class _Worker:
    """Per-thread reusable buffers: page-faulting fresh memory per piece would cost as much as
    the arithmetic."""

    def __init__(self) -> None:
        self.read, self.f32, self.acc, self.base, self.out = (Scratch() for _ in range(5))
        self.bytes_read = 0

    def fp32(self, part: torch.Tensor) -> torch.Tensor:
        self.bytes_read += part.numel() * part.element_size()
        if part.dtype == torch.float32:
            return part
        return self.f32.tensor(part.numel(), torch.float32).view(part.shape).copy_(part)


def _merge_piece(plan: _Plan, job: _Job, w: _Worker) -> torch.Tensor:
    n, origin = regions.numel(job.sizes), job.offsets
    first = plan.readers[0]
    if not first.info(job.key).dtype.is_floating_point:  # integer state: the first input's
        out = w.out.tensor(n, job.out_dtype).view(job.sizes)
        for box, part in first.iter_region(job.key, job.offsets, job.sizes, w.read):
            out[regions.as_slices(box, origin)] = part
            w.bytes_read += part.numel() * part.element_size()
        return out
    acc = w.acc.tensor(n, torch.float32).view(job.sizes)
    if plan.base is None:
        for k, (reader, c) in enumerate(zip(plan.readers, plan.coefficients)):
            for box, part in reader.iter_region(job.key, job.offsets, job.sizes, w.read):
                view = acc[regions.as_slices(box, origin)]
                if k == 0:
                    torch.mul(w.fp32(part), c, out=view)
                else:
                    view.add_(w.fp32(part), alpha=c)
    else:
        base = w.base.tensor(n, torch.float32).view(job.sizes)
        for box, part in plan.base.iter_region(job.key, job.offsets, job.sizes, w.read):
            base[regions.as_slices(box, origin)] = w.fp32(part)
        acc.copy_(base)
        for reader, c in zip(plan.readers, plan.coefficients):
            for box, part in reader.iter_region(job.key, job.offsets, job.sizes, w.read):
                sl = regions.as_slices(box, origin)
                w.bytes_read += part.numel() * part.element_size()
                delta = w.f32.tensor(part.numel(), torch.float32).view(part.shape)
                if part.dtype == torch.float32:
                    torch.sub(part, base[sl], out=delta)
                else:
                    delta.copy_(part).sub_(base[sl])
                acc[sl].add_(delta, alpha=c)
    if job.out_dtype == torch.float32:
        return acc
    return w.out.tensor(n, job.out_dtype).view(job.sizes).copy_(acc)


def _run_jobs(
    plan: _Plan, writer: TorchDistWriter, workers: int, total: int, progress: bool
) -> int:
    jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
    for job in plan.jobs:
        jobs.put(job)
    stop = threading.Event()
    errors: list[BaseException] = []
    states = [_Worker() for _ in range(workers)]
    bar = _progress_bar(total, progress)
    bar_lock = threading.Lock()

    finished = [threading.Event() for _ in range(workers)]

    def loop(index: int) -> None:
        w = states[index]
        try:
            while not stop.is_set():
                try:
                    job = jobs.get_nowait()
                except queue.Empty:
                    return
                out = _merge_piece(plan, job, w)
                writer.write_chunk(job.key, job.offsets, out, file_index=index)
                if bar is not None:
                    with bar_lock:
                        bar.update(out.numel() * out.element_size())
        except BaseException as e:  # noqa: BLE001 - surfaced in the main thread
            errors.append(e)
            stop.set()
        finally:
            finished[index].set()

    # Workers start with SIGINT/SIGTERM blocked (the mask is inherited), so those signals reach
    # only this thread, and never while a worker is half started.
    threads = [threading.Thread(target=loop, args=(i,), name=f"merge-{i}") for i in range(workers)]
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for t in threads:
                t.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        # our own events, not Thread.join: an interrupted join can report a live thread stopped
        for done in finished:
            while not done.wait(0.1):  # wake up so Ctrl-C / SIGTERM reach us
                pass
    except BaseException:
        stop.set()  # each worker finishes its piece; only then may the caller delete the output
        for t, done in zip(threads, finished):
            if t.ident is not None:
                done.wait()
                t.join()
        raise
    finally:
        if bar is not None:
            bar.close()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(w.bytes_read for w in states)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, desc="merge", file=sys.stderr, smoothing=0.1
    )
