"""Merge branch checkpoints (torch_dist) into one, streaming, at disk speed, in bounded memory.

    stats = merge_checkpoints([a, b], out)                                   # uniform average
    stats = merge_checkpoints([a, b, c], out, weights=[2, 1, 1], dtype="bf16")
    stats = merge_checkpoints([a, b], out, method="task_arithmetic", base=base, weights=[.7, .7])

average:          out = sum_k w_k * theta_k / sum_k w_k
task_arithmetic:  out = base + sum_k w_k * (theta_k - base)      (weights not normalised)

How: every output tensor is cut into pieces of about ``chunk_mb`` (fp32) that span the full
extent of their trailing dims (``regions.split_rows``), so each piece meets each stored chunk of
each input — whatever TP/PP saved it — in one contiguous run. Each input's piece is gathered
into a reusable buffer (read straight from the file where the chunk layout allows), the pieces
are combined in fp32 in cache-sized blocks, and the result is written as a chunk of the output.
``workers`` threads do this side by side, one output data file each (file I/O and torch's kernels
release the GIL), each prefetching its next piece. Memory is a few pieces per worker,
independent of the model size.

By default only the model weights (``model.*``) go to the output, with the model part of
megatron's common state and the modules' ``_extra_state`` copied from the first input.
``include_optimizer`` merges every tensor (optimizer moments too) and copies all non-tensor state
from the first input.
"""

from __future__ import annotations

import contextlib
import os
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
from megatron_copd.models.precision import TORCH_DTYPES as DTYPES

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
    worker_seconds: dict[str, float] = field(default_factory=dict)
    """Time the workers spent reading, computing and writing (summed over workers)."""

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

    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(TorchDistReader(p)) for p in inputs]
        base_reader = stack.enter_context(TorchDistReader(base)) if base is not None else None
        everyone = readers + ([base_reader] if base_reader is not None else [])
        checks.check_same_model(everyone)
        fingerprint = checks.check_lineage(readers, base_reader)
        checks.check_same_keys(everyone, include_optimizer)
        tensor_keys, object_keys = checks.select_keys(readers[0], include_optimizer)
        dtypes = checks.resolve_dtype(readers, tensor_keys, out_dtype)
        checks.check_objects_compatible(readers, object_keys)
        if method == "average":
            coefficients = [w / sum(raw_weights) for w in raw_weights]
        else:
            coefficients = list(raw_weights)
        plan = _Plan(readers, base_reader, coefficients)
        for key in tensor_keys:
            shape = readers[0].info(key).shape
            for offsets, sizes in regions.split_rows(shape, 4, int(chunk_mb * 2**20)):
                plan.jobs.append(_Job(key, offsets, sizes, dtypes[key]))
        out_bytes = sum(
            regions.numel(readers[0].info(k).shape) * dtypes[k].itemsize for k in tensor_keys
        )
        _check_free_space(output, out_bytes)

        stack.enter_context(_one_intra_op_thread())
        writer = stack.enter_context(
            TorchDistWriter(output, overwrite=overwrite, num_files=workers)
        )
        for key in tensor_keys:
            writer.declare_tensor(key, readers[0].info(key).shape, dtypes[key])
        _copy_objects(readers[0], writer, object_keys, include_optimizer)
        bytes_read, worker_seconds = _run_jobs(plan, writer, workers, out_bytes, progress)
        writer.meta = _output_meta(plan, fingerprint, method, raw_weights, base, include_optimizer)
        writer.commit()
    return MergeStats(
        output=output,
        method=method,
        coefficients=coefficients,
        base_fingerprint=fingerprint,
        tensors=len(tensor_keys),
        pieces=len(plan.jobs),
        bytes_read=bytes_read,
        bytes_written=writer.bytes_written,
        seconds=time.perf_counter() - start,
        worker_seconds=worker_seconds,
    )


@contextlib.contextmanager
def _one_intra_op_thread():
    """Parallelism comes from the workers; torch's intra-op threads on top of them only add
    barrier waits to every small block op (x40 slower on a busy machine). The setting is
    process-wide, so it is restored after the merge."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


# Elements per arithmetic block: fp32 accumulator + temporaries stay in a core's L2 cache, so
# the 2K+1 passes over a piece (convert, scale/add per input, round to the output dtype) cost
# about one trip to memory instead of 2K+1.
BLOCK = 1 << 17


class _Worker:
    """Per-thread reusable buffers: page-faulting fresh memory per piece would cost as much as
    the arithmetic."""

    def __init__(self, n_inputs: int) -> None:
        self.inputs = [Scratch() for _ in range(n_inputs + 1)]  # + the base
        self.read, self.out = Scratch(), Scratch()
        self.acc = torch.empty(BLOCK, dtype=torch.float32)
        self.tmp = torch.empty(BLOCK, dtype=torch.float32)
        self.tmp_base = torch.empty(BLOCK, dtype=torch.float32)
        self.bytes_read = 0
        self.seconds = {"read": 0.0, "compute": 0.0, "write": 0.0}

    def gather(self, reader: TorchDistReader, slot: int, job: _Job) -> torch.Tensor:
        """The piece of one input, flat, in its stored dtype (read straight into the buffer
        wherever the stored chunks allow)."""
        info = reader.info(job.key)
        n = regions.numel(job.sizes)
        flat = self.inputs[slot].tensor(n, info.dtype)
        t0 = time.perf_counter()
        reader.read_into(job.key, flat.view(job.sizes), job.offsets, scratch=self.read)
        self.seconds["read"] += time.perf_counter() - t0
        self.bytes_read += n * info.dtype.itemsize
        return flat


def _merge_piece(plan: _Plan, job: _Job, w: _Worker) -> torch.Tensor:
    n = regions.numel(job.sizes)
    first = plan.readers[0]
    if not first.info(job.key).dtype.is_floating_point:  # integer state: the first input's
        return w.gather(first, 0, job).view(job.sizes)
    xs = [w.gather(r, k, job) for k, r in enumerate(plan.readers)]
    base = w.gather(plan.base, len(xs), job) if plan.base is not None else None
    t0 = time.perf_counter()
    out = w.out.tensor(n, job.out_dtype)
    for s in range(0, n, BLOCK):
        e = min(n, s + BLOCK)
        acc = out[s:e] if job.out_dtype == torch.float32 else w.acc[: e - s]
        tmp = w.tmp[: e - s]
        if base is None:  # sum_k c_k x_k
            for k, (x, c) in enumerate(zip(xs, plan.coefficients)):
                xf = _as_fp32(x[s:e], tmp)
                if k == 0:
                    torch.mul(xf, c, out=acc)
                else:
                    acc.add_(xf, alpha=c)
        else:  # base + sum_k c_k (x_k - base)
            b = _as_fp32(base[s:e], w.tmp_base[: e - s])
            acc.copy_(b)
            for x, c in zip(xs, plan.coefficients):
                delta = torch.sub(_as_fp32(x[s:e], tmp), b, out=tmp)
                acc.add_(delta, alpha=c)
        if job.out_dtype != torch.float32:
            out[s:e].copy_(acc)
    w.seconds["compute"] += time.perf_counter() - t0
    return out.view(job.sizes)


def _as_fp32(x: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else buf.copy_(x)


def _run_jobs(
    plan: _Plan, writer: TorchDistWriter, workers: int, total: int, progress: bool
) -> int:
    next_job = iter(range(len(plan.jobs)))
    next_lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []
    states = [_Worker(len(plan.readers)) for _ in range(workers)]
    bar = _progress_bar(total, progress)
    bar_lock = threading.Lock()

    finished = [threading.Event() for _ in range(workers)]

    def loop(index: int) -> None:
        w = states[index]
        try:
            while not stop.is_set():
                with next_lock:
                    i = next(next_job, None)
                if i is None:
                    return
                job = plan.jobs[i]
                if i + workers < len(plan.jobs):  # what this worker will likely take next
                    ahead = plan.jobs[i + workers]
                    for r in plan.readers + ([plan.base] if plan.base else []):
                        r.prefetch(ahead.key, ahead.offsets, ahead.sizes)
                out = _merge_piece(plan, job, w)
                t0 = time.perf_counter()
                writer.write_chunk(job.key, job.offsets, out, file_index=index)
                w.seconds["write"] += time.perf_counter() - t0
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
    seconds = {k: sum(w.seconds[k] for w in states) for k in states[0].seconds}
    return sum(w.bytes_read for w in states), seconds


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, desc="merge", file=sys.stderr, smoothing=0.1
    )
