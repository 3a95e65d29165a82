"""The local launcher: ``copd train`` run plainly starts its own worker processes.

Like torchrun on one node, but small and with the exit-code semantics the SLURM scripts rely
on. Each worker runs the same command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` and ``COPD_LAUNCHER=local`` set, which
:func:`megatron_copd.runtime.distributed.launch_env` reads.

Behaviour:
- SIGTERM / SIGUSR1 / SIGINT sent to the launcher are forwarded to every worker (the workers
  run in their own process group, so a Ctrl-C in the terminal reaches them once, through the
  launcher). A second SIGINT kills them.
- A worker that fails (exit code other than 0 and ``EXIT_REQUEUE``) ends the run: the others
  get SIGTERM, then SIGKILL after ``kill_grace_s``.
- After the first worker exits cleanly, the others have ``exit_wait_s`` to follow (same rule as
  ``srun --wait`` in slurm/launch.sh), then they are killed.
- Workers die with the launcher even if it is SIGKILLed (PR_SET_PDEATHSIG, set by the worker
  itself in :func:`die_with_launcher`).

Exit code: the first failure's code (the root cause; the workers killed afterwards are not
counted), else ``EXIT_REQUEUE`` if any worker asked for a requeue, else 0.

Hook for a distributed command (2 lines at its top)::

    rc = relaunch_if_needed(cfg.world_size, ["train", *cli_args])
    if rc is not None:
        return rc

or, having checked ``launch_env().launcher == "single"`` itself,
``launch_local(cfg.world_size, [sys.executable, "-m", "megatron_copd.cli", *sys.argv[1:]])``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from megatron_copd.runtime.exit_codes import (
    EXIT_OK,
    EXIT_REQUEUE,
    EXIT_WAIT_S,
    describe,
    signal_exit_code,
)

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_PR_SET_PDEATHSIG = 1


def cli_command(argv: list[str]) -> list[str]:
    """The worker command for ``copd <argv>`` with this interpreter."""
    return [sys.executable, "-m", "megatron_copd.cli", *argv]


def relaunch_if_needed(world_size: int, argv: list[str]) -> int | None:
    """Start ``world_size`` local workers of ``copd <argv>`` when run plainly.

    Returns None when this process is already a rank of a launched job (torchrun, srun, our
    own workers) or when one process is enough; the caller then goes on. Otherwise returns the
    workers' combined exit code, which the caller returns.
    """
    from megatron_copd.runtime.distributed import launch_env

    if world_size <= 1 or launch_env().launcher != "single":
        return None
    return run_workers(cli_command(argv), world_size)


def launch_local(world_size: int, cmd: list[str]) -> int:
    """Run ``cmd`` as ``world_size`` local ranks (the call ``training/entry.py`` makes)."""
    return run_workers(cmd, world_size)


@dataclass
class _Worker:
    rank: int
    proc: subprocess.Popen
    code: int | None = None
    exited_at: float | None = None


@dataclass
class _State:
    workers: list[_Worker] = field(default_factory=list)
    interrupts: int = 0


def worker_env(rank: int, world_size: int, master_port: int, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(master_port),
        COPD_LAUNCHER="local",
        COPD_LAUNCHER_PID=str(os.getpid()),
    )
    return env


def run_workers(
    cmd: list[str],
    world_size: int,
    *,
    env: dict | None = None,
    master_port: int | None = None,
    exit_wait_s: float = EXIT_WAIT_S,
    kill_grace_s: float = 30.0,
    poll_s: float = 0.05,
) -> int:
    """Run ``cmd`` as ``world_size`` ranks; forward signals; return the combined exit code."""
    port = master_port or _free_port()
    state = _State()

    def forward(signum: int, frame) -> None:
        if signum == signal.SIGINT:
            state.interrupts += 1
            if state.interrupts > 1:
                _signal_all(state.workers, signal.SIGKILL)
                return
        _signal_all(state.workers, signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        for rank in range(world_size):
            proc = subprocess.Popen(
                cmd, env=worker_env(rank, world_size, port, env), process_group=0
            )
            state.workers.append(_Worker(rank, proc))
        return _supervise(state.workers, exit_wait_s, kill_grace_s, poll_s)
    finally:
        _signal_all(state.workers, signal.SIGKILL)
        for w in state.workers:
            w.proc.wait()
        for s, h in previous.items():
            signal.signal(s, h)


def _supervise(workers: list[_Worker], exit_wait_s: float, kill_grace_s: float, poll: float) -> int:
    first_failure: _Worker | None = None
    first_clean_exit: float | None = None
    kill_deadline: float | None = None
    while True:
        now = time.monotonic()
        for w in workers:
            if w.code is None and (rc := w.proc.poll()) is not None:
                w.code, w.exited_at = signal_exit_code(rc), now
                if w.code not in (EXIT_OK, EXIT_REQUEUE) and first_failure is None:
                    first_failure = w
                    print(
                        f"copd launch: rank {w.rank} {describe(w.code)}; stopping the others",
                        file=sys.stderr,
                        flush=True,
                    )
                    _signal_all(workers, signal.SIGTERM)
                    kill_deadline = now + kill_grace_s
                elif first_clean_exit is None:
                    first_clean_exit = now
        running = [w for w in workers if w.code is None]
        if not running:
            break
        if (
            first_failure is None
            and first_clean_exit is not None
            and now - first_clean_exit > exit_wait_s
            and kill_deadline is None
        ):
            print(
                f"copd launch: ranks {[w.rank for w in running]} still running "
                f"{exit_wait_s:.0f} s after another rank exited; stopping them",
                file=sys.stderr,
                flush=True,
            )
            _signal_all(workers, signal.SIGTERM)
            kill_deadline = now + kill_grace_s
        if kill_deadline is not None and now > kill_deadline:
            _signal_all(workers, signal.SIGKILL)
        time.sleep(poll)
    return combine_exit_codes(workers, first_failure)


def combine_exit_codes(workers: list[_Worker], first_failure: _Worker | None = None) -> int:
    if first_failure is not None:
        return first_failure.code
    codes = [w.code for w in workers]
    failed = [c for c in codes if c not in (EXIT_OK, EXIT_REQUEUE)]
    if failed:  # ranks that were stopped because they outlived the exit window
        return failed[0]
    return EXIT_REQUEUE if EXIT_REQUEUE in codes else EXIT_OK


def _signal_all(workers: list[_Worker], signum: int) -> None:
    for w in workers:
        if w.code is None and w.proc.poll() is None:
            try:
                w.proc.send_signal(signum)
            except ProcessLookupError:
                pass


def _free_port() -> int:
    # Same as distributed.free_port, without importing torch into the supervising process.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_launcher() -> None:
    """In a local worker: get SIGKILLed if the launcher dies (Linux; no-op elsewhere)."""
    parent = os.environ.get("COPD_LAUNCHER_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    # The launcher may have died before prctl took effect.
    if os.getppid() != int(parent):
        os._exit(128 + signal.SIGKILL)
