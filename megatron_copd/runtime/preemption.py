"""Stop cleanly on SIGTERM / SIGUSR1 (what SLURM sends before a time limit or a preemption).

The signal handler only sets a flag. The engine calls :meth:`PreemptionHandler.should_stop` once
per step on every rank; it takes the MAX of the flag over the whole world (one tiny all-reduce),
so every rank - also those that were not signalled, or got the signal a moment later - decides to
stop after the same step. The engine then writes a checkpoint (``CheckpointManager.
save_for_preemption``, which respects the grace period) and exits with ``EXIT_REQUEUE``.
The same handler serves ``copd selftest --hold``.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Self

import torch
import torch.distributed as dist

from megatron_copd.runtime.exit_codes import PREEMPTION_SIGNALS as DEFAULT_SIGNALS


class PreemptionHandler:
    """Install with :meth:`install` (main thread) before training; ``uninstall`` restores."""

    def __init__(
        self,
        grace_seconds: float = 120.0,
        signals: tuple[int, ...] = DEFAULT_SIGNALS,
        group=None,
    ) -> None:
        self.grace_seconds = float(grace_seconds)
        self.signals = tuple(signals)
        self.group = group  # None: the whole world
        self.signal_name: str | None = None
        self.signal_time: float | None = None  # time.monotonic() of the first local signal
        self.stop_time: float | None = None  # when the ranks agreed to stop
        self._flag = False
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionHandler:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _on_signal(self, signum, frame) -> None:
        if self._flag:
            return
        self._flag = True
        self.signal_time = time.monotonic()
        self.signal_name = signal.Signals(signum).name
        rank = dist.get_rank() if dist.is_initialized() else 0
        # os.write: no buffered I/O inside a signal handler.
        os.write(2, f"[rank {rank}] received {self.signal_name}: stopping after this step "
                    f"(grace {self.grace_seconds:.0f}s)\n".encode())

    def request_stop(self, reason: str = "request") -> None:
        """Set the flag programmatically (same effect as a signal)."""
        if not self._flag:
            self._flag = True
            self.signal_time = time.monotonic()
            self.signal_name = reason

    @property
    def signalled(self) -> bool:
        """This rank saw a signal (local; no communication)."""
        return self._flag

    def should_stop(self) -> bool:
        """Collective over the group (default: world): True on every rank once any rank has
        been signalled. Call at the same point of every step on every rank."""
        flag = torch.tensor([1 if self._flag else 0], dtype=torch.int32, device=_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        stop = bool(flag.item())
        if stop and self.stop_time is None:
            self.stop_time = time.monotonic()
        return stop

    def elapsed(self) -> float:
        """Seconds since this rank's signal (or since the agreement to stop)."""
        start = self.signal_time if self.signal_time is not None else self.stop_time
        return 0.0 if start is None else time.monotonic() - start

    def time_left(self) -> float:
        """Seconds left of the grace period on this rank."""
        return self.grace_seconds - self.elapsed()


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
