"""Notice a preemption request (SIGTERM / SIGUSR1) and agree on it across ranks.

The handler only records the signal: all real work (finish the step, checkpoint, exit with
``EXIT_REQUEUE``) happens in the training loop at a step boundary, after every rank agreed that
a stop was requested. Agreement is needed because the signal does not reach all ranks at the same
instant (srun relays it node by node); a rank that stopped alone would leave its peers blocked
in the next collective.

    watcher = PreemptionWatcher()               # on every rank, before the loop
    for step in ...:
        train_step()
        if watcher.stop_requested(group=None):  # collective: call on every rank, every step
            save_checkpoint(); barrier(); sys.exit(EXIT_REQUEUE)
"""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Self

import torch
import torch.distributed as dist

from megatron_copd.runtime.exit_codes import PREEMPTION_SIGNALS


class PreemptionWatcher:
    """Installs handlers for the preemption signals; restores the previous ones on ``close``."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS) -> None:
        self.received: signal.Signals | None = None
        self.received_at: float | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            self.received_at = time.monotonic()

    @property
    def requested_locally(self) -> bool:
        return self.received is not None

    def stop_requested(self, group: dist.ProcessGroup | None = None) -> bool:
        """True on every rank of ``group`` (default: the world) if any of them got a signal.

        Collective (a one-element MAX all-reduce): every rank of the group must call it at the
        same point. Without torch.distributed it is the local flag.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested_locally
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        flag = torch.tensor([1 if self.requested_locally else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
