"""The frame every ``tools/`` script runs its work in.

Bad input (a :class:`~megatron_copd.errors.UserError`) prints one ``PROG: error: ...`` line and
exits 2; SIGTERM is turned into KeyboardInterrupt so it unwinds through the writers, which
remove their temporary output, and exits 130 like Ctrl-C. Success prints ``report(result)``.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import TypeVar

from megatron_copd.errors import UserError

T = TypeVar("T")


def _terminate(signum, frame):
    raise KeyboardInterrupt


def run_tool(prog: str, work: Callable[[], T], report: Callable[[T], str]) -> int:
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        result = work()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no output written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(report(result))
    return 0
