"""Run megatron-core on a CPU-only machine (gloo backend).

megatron-core has no CPU path: it calls ``torch.cuda.current_device()``, allocates with
``device="cuda"``, moves tensors with ``.cuda()``, keeps its RNG states on the CUDA generator,
records CUDA events and asserts CUDA tensor types. This module makes those calls resolve to the
CPU so that the *same* megatron code (model forward/backward, pipeline schedules, the static
inference path, distributed checkpointing, the optimizer) runs unchanged under gloo.

It is one switch, :func:`activate`, which does nothing when CUDA is available: on a GPU machine
nothing here is ever touched. Everything it changes is listed in this file.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_active = False
_mode: "_CudaToCpuMode | None" = None

_CPU = torch.device("cpu")


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # A bare int device index means a CUDA ordinal in torch's factory functions.
    return isinstance(dev, int) and not isinstance(dev, bool)


def _cpu_if_cuda(dev: Any) -> Any:
    return _CPU if _is_cuda_device(dev) else dev


_TENSOR_CUDA = torch.Tensor.cuda
_TENSOR_TO = torch.Tensor.to
_TENSOR_PIN = torch.Tensor.pin_memory
_TENSOR_TYPE = torch.Tensor.type


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites every CUDA device request made through a torch function to the CPU.

    Covers ``torch.empty(..., device="cuda")``, ``device=torch.cuda.current_device()``,
    ``tensor.cuda()``, ``tensor.to("cuda")``, ``tensor.pin_memory()`` and ``tensor.type()``
    (megatron's gradient clipping asserts ``'torch.cuda.FloatTensor'``).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _TENSOR_CUDA:
            return args[0]
        if func is _TENSOR_PIN:
            return args[0]
        if func is _TENSOR_TO:
            args = tuple(_cpu_if_cuda(a) for a in args)
            if "device" in kwargs:
                kwargs["device"] = _cpu_if_cuda(kwargs["device"])
            kwargs.pop("non_blocking", None)
        elif func is _TENSOR_TYPE and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        elif "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        return func(*args, **kwargs)


class _CpuEvent:
    """Stand-in for ``torch.cuda.Event``: records wall time so elapsed_time still works."""

    def __init__(self, *args, **kwargs):
        self._t = None

    def record(self, *args, **kwargs):
        import time

        self._t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self):
        return True

    def elapsed_time(self, end: "_CpuEvent") -> float:
        return (end._t - self._t) * 1000.0


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or _CpuEvent()

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cpu_get_rng_state(device: Any = "cuda", *args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.Event = _CpuEvent
    cuda.Stream = _CpuStream
    cuda.current_stream = lambda *a, **k: _CpuStream()
    cuda.default_stream = lambda *a, **k: _CpuStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = _cpu_get_rng_state
    cuda.set_rng_state = _cpu_set_rng_state
    cuda.random.get_rng_state = _cpu_get_rng_state
    cuda.random.set_rng_state = _cpu_set_rng_state
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None


def _patch_megatron() -> None:
    """The few megatron functions that bypass the generic rewrites above."""
    from megatron.core.tensor_parallel import random as mrandom

    # The RNG tracker reads/writes the CUDA generator through private helpers.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)

    # Pipeline-parallel inference asserts ``tensor.is_cuda`` on what it sends.
    from megatron.core.inference import communication_utils

    communication_utils._is_cuda = lambda tensor: None


def activate() -> bool:
    """Switch megatron-core to the CPU when CUDA is absent. Idempotent.

    Returns True when the compatibility layer is (now) active, False on CUDA machines.
    Call it before building models; it is process-wide and stays on for the process lifetime.
    """
    global _active, _mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _active:
            return True
        _patch_torch_cuda()
        _patch_megatron()
        _mode = _CudaToCpuMode()
        _mode.__enter__()
        _active = True
    return True


def is_active() -> bool:
    return _active
