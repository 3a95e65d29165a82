"""Process exit codes shared by the CLI, the local launcher and the SLURM scripts.

Defined here once; ``slurm/launch.sh`` repeats ``EXIT_REQUEUE`` (a test keeps them equal).

EXIT_REQUEUE means "I was asked to stop (SIGTERM / SIGUSR1), I wrote a complete checkpoint and
the run is not finished: start me again". 75 is ``EX_TEMPFAIL`` from sysexits.h ("temporary
failure, the user is invited to retry"): it cannot be confused with Python's own codes (1 for an
uncaught exception, 2 for usage errors), a shell's 126/127, or 128+N for death by signal N.

Contract for code that exits with it (the checkpoint/preemption path of ``copd train``):
every rank must reach the same point (a barrier after the checkpoint is complete), then exit
with EXIT_REQUEUE. The launchers give the other ranks a bounded time to follow the first one
that exits (``srun --wait``, :data:`EXIT_WAIT_S` locally); a rank that exits alone is treated as
a failure once that window is over.
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected exception
EXIT_USER_ERROR = 2  # bad config / data / checkpoint / layout; a one-line message was printed
EXIT_REQUEUE = 75  # preempted after a complete checkpoint: requeue and resume from `latest`

# Signals that mean "checkpoint and stop": SLURM sends SIGTERM at the time limit and on
# preemption, and the sbatch scripts ask for SIGUSR1 `grace` seconds before the limit.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# How long the launchers wait for the remaining ranks after the first one exits cleanly
# (0 or EXIT_REQUEUE) before killing them. Failed ranks (any other code) end the job at once.
EXIT_WAIT_S = 120.0


def signal_exit_code(returncode: int) -> int:
    """subprocess returncode -> shell convention (death by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def describe(code: int) -> str:
    """Human-readable meaning of an exit code, for launcher log lines."""
    if code == EXIT_OK:
        return "ok"
    if code == EXIT_REQUEUE:
        return "preempted after a checkpoint (requeue)"
    if code == EXIT_USER_ERROR:
        return "user error (see the message above)"
    if code > 128:
        try:
            return f"killed by {signal.Signals(code - 128).name}"
        except ValueError:
            return f"exit code {code}"
    return f"failed with exit code {code}"
