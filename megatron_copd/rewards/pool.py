"""RewardPool: verification in worker processes with a per-item time limit.

Why processes: math-verify (sympy) can run for unbounded time and times itself out with
``signal.alarm``, which only works in a process's main thread; a training process has other
threads and must never hang on a reward. Each worker is a plain subprocess
(``python -m megatron_copd.rewards.worker``) rather than a multiprocessing child: no fork of a
process holding CUDA/NCCL state, no re-import of the training script, and a start-up cost of
"import sympy" (~0.5 s, overlapped with the caller's work since workers start in the background).

Guarantees: a verifier that raises, returns something outside [0, 1], or exceeds ``timeout_s``
gives reward 0 and is counted (``num_errors`` / ``num_timeouts``); a timed-out or crashed worker
is killed and replaced; :meth:`RewardPool.score` always returns. The one exception: if workers
cannot even start (``max_start_failures`` in a row), a :class:`RewardPoolError` says why, since
no reward could ever be computed.

Your own verifiers: register them in an importable module and pass it in ``plugin_modules`` (it
is imported here and in every worker); a verifier registered by a module this process imported
is also found by the workers (they import the verifier's module on first use). Workers receive
this process's ``sys.path`` so they can import what it can.

Inline verifiers (``register_verifier(..., inline=True)``: the built-in exact / choice / numeric)
run in the calling process without a round-trip; ``num_workers=0`` runs everything inline (no
time limits except math-verify's own; must then be called from the main thread).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import selectors
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from megatron_copd.errors import UserError
from megatron_copd.rewards import builtin as _builtin  # noqa: F401 — registers the built-ins
from megatron_copd.rewards.registry import VerifierSpec, verifier_spec

__all__ = ["RewardPool", "RewardResult", "RewardPoolError"]

_MAX_ERROR_MESSAGES = 20


class RewardPoolError(UserError):
    """The reward workers cannot start (bad plugin module, broken environment)."""


@dataclass
class RewardResult:
    rewards: list[float]
    num_errors: int = 0
    num_timeouts: int = 0
    status: list[str] = field(default_factory=list)
    """Per item: "ok", "error" or "timeout"."""
    errors: list[str] = field(default_factory=list)
    """The first few error messages ("verifier: ExceptionType: message"), for logs."""


class _Worker:
    def __init__(self, cmd: list[str], env: dict[str, str], start_timeout_s: float):
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # a verifier's prints and warnings reach the training log
            env=env,
            close_fds=True,
        )
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""
        self.ready = False
        self.deadline = time.monotonic() + start_timeout_s
        self.item: int | None = None
        self.req = -1

    def send(self, msg: dict) -> None:
        self.proc.stdin.write((json.dumps(msg) + "\n").encode("utf-8"))
        self.proc.stdin.flush()

    def read_lines(self) -> list[dict] | None:
        """Complete messages available now; None at end of file (the worker exited)."""
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        msgs = []
        for ln in lines:
            try:
                msgs.append(json.loads(ln))
            except ValueError:  # not ours; a lost reply ends as a counted timeout
                pass
        return msgs

    def exit_code(self) -> int | None:
        """Exit status of a worker whose output just ended (it may still be exiting)."""
        try:
            return self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover — SIGKILL cannot be ignored
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def close(self, grace_s: float = 2.0) -> None:
        try:
            self.proc.stdin.close()  # end of input: the worker exits after its current item
            self.proc.wait(timeout=grace_s)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class RewardPool:
    """Score (verifier, response, answer) items in worker processes with a time limit each.

    One pool per training process; :meth:`score` is not re-entrant (call it from one thread).
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        plugin_modules: Sequence[str] = (),
        inline_fast_path: bool = True,
        start_timeout_s: float = 120.0,
        max_start_failures: int = 3,
    ):
        if num_workers < 0:
            raise ValueError(f"RewardPool: num_workers must be >= 0, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"RewardPool: timeout_s must be > 0, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.plugin_modules = list(plugin_modules)
        self.inline_fast_path = inline_fast_path
        self.start_timeout_s = start_timeout_s
        self.max_start_failures = max_start_failures
        for mod in self.plugin_modules:
            try:
                importlib.import_module(mod)
            except Exception as e:
                raise RewardPoolError(
                    f"reward plugin module {mod!r} cannot be imported: {type(e).__name__}: {e}"
                ) from None
        self._cmd = [
            sys.executable,
            "-m",
            "megatron_copd.rewards.worker",
            json.dumps(self.plugin_modules),
        ]
        env = dict(os.environ)
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        self._env = env
        self._sel = selectors.DefaultSelector()
        self._workers: list[_Worker] = []
        self._start_failures = 0
        self._broken: str | None = None
        self._next_req = 0
        self._closed = False
        self.restarts = 0
        """Workers replaced so far (timeouts and crashes)."""
        for _ in range(num_workers):
            self._spawn()

    # -- worker management ---------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        w = _Worker(self._cmd, self._env, self.start_timeout_s)
        self._sel.register(w.fd, selectors.EVENT_READ, w)
        self._workers.append(w)
        return w

    def _retire(self, w: _Worker, *, replace: bool) -> None:
        self._sel.unregister(w.fd)
        self._workers.remove(w)
        w.kill()
        if replace and not self._closed:
            self.restarts += 1
            self._spawn()

    def _start_failed(self, w: _Worker, why: str) -> None:
        self._start_failures += 1
        code = w.proc.poll()
        self._retire(w, replace=False)
        if self._start_failures >= self.max_start_failures:
            self._broken = (
                f"reward workers failed to start {self._start_failures} times in a row "
                f"(last: {why}{'' if code is None else f', exit code {code}'}); "
                f"command: {' '.join(self._cmd)}"
            )
            raise RewardPoolError(self._broken)
        self._spawn()

    # -- scoring -------------------------------------------------------------------------------

    def _check_spec(self, name: str) -> VerifierSpec:
        spec = verifier_spec(name)
        if self.num_workers and not self._runs_inline(spec) and spec.module == "__main__":
            raise UserError(
                f"reward verifier {name!r} is defined in the __main__ script, which worker "
                "processes cannot import; move it to a module and pass it in plugin_modules"
            )
        return spec

    def _runs_inline(self, spec: VerifierSpec) -> bool:
        return self.num_workers == 0 or (self.inline_fast_path and spec.inline)

    def score(self, items: Sequence[tuple[str, str, str]]) -> RewardResult:
        """Rewards for ``(verifier_name, response, answer)`` items, in order.

        Unknown verifier names raise UnknownVerifierError before anything runs (a config
        error); everything a verifier does at run time is contained and counted.
        """
        if self._closed:
            raise RuntimeError("RewardPool.score: the pool is closed")
        if self._broken:
            raise RewardPoolError(self._broken)
        specs = {name: self._check_spec(name) for name in {it[0] for it in items}}
        n = len(items)
        res = RewardResult(rewards=[0.0] * n, status=["ok"] * n)
        failures: list[tuple[int, str]] = []

        def fail(i: int, kind: str, msg: str) -> None:
            res.status[i] = kind
            if kind == "timeout":
                res.num_timeouts += 1
            else:
                res.num_errors += 1
            failures.append((i, f"item {i} ({items[i][0]}): {msg}"))

        pending: deque[int] = deque()
        for i, (name, response, answer) in enumerate(items):
            spec = specs[name]
            if not self._runs_inline(spec):
                pending.append(i)
                continue
            try:
                value = float(spec.fn(response, answer))
                if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                    raise ValueError(f"returned {value}, expected a number in [0, 1]")
                res.rewards[i] = value
            except Exception as e:  # noqa: BLE001 — contained and counted
                fail(i, "error", f"{type(e).__name__}: {e}")
        if pending:
            self._reset_busy()
            self._run_remote(items, specs, pending, res, fail)
        res.errors = [msg for _, msg in sorted(failures)[:_MAX_ERROR_MESSAGES]]
        return res

    def _run_remote(
        self, items, specs, pending: deque[int], res, fail, until_ready: bool = False
    ) -> None:
        remaining = len(pending)
        while remaining or (until_ready and not all(w.ready for w in self._workers)):
            now = time.monotonic()
            for w in list(self._workers):
                if w.ready and w.item is None and pending:
                    i = pending.popleft()
                    name, response, answer = items[i]
                    try:
                        self._next_req += 1
                        msg = {"i": self._next_req, "v": name, "m": specs[name].module}
                        w.send({**msg, "r": response, "a": answer})
                    except (BrokenPipeError, OSError):
                        pending.appendleft(i)  # it died while idle: retry on a fresh worker
                        self._retire(w, replace=True)
                        continue
                    w.item, w.req = i, self._next_req
                    w.deadline = now + self.timeout_s
            waits = [w.deadline - now for w in self._workers if w.item is not None or not w.ready]
            wait = max(0.0, min(waits)) if waits else 0.05
            for key, _ in self._sel.select(timeout=wait):
                w: _Worker = key.data
                if w not in self._workers:
                    continue
                msgs = w.read_lines()
                if msgs is None:  # end of file: the worker exited
                    if not w.ready:
                        self._start_failed(w, "exited during start-up")
                    else:
                        if w.item is not None:
                            fail(w.item, "error", f"worker exited (code {w.exit_code()})")
                            remaining -= 1
                        self._retire(w, replace=True)
                    continue
                for msg in msgs:
                    if "fatal" in msg:
                        self._start_failed(w, msg["fatal"])
                        break
                    if msg.get("ready"):
                        w.ready = True
                        self._start_failures = 0
                        continue
                    if msg["i"] != w.req or w.item is None:  # not the request in flight
                        continue
                    i, w.item = w.item, None
                    remaining -= 1
                    if "x" in msg:
                        res.rewards[i] = float(msg["x"])
                    else:
                        fail(i, "error", msg.get("e", "unknown error"))
            now = time.monotonic()
            for w in list(self._workers):
                if now < w.deadline:
                    continue
                if w.item is not None:
                    fail(w.item, "timeout", f"no result within {self.timeout_s:g} s")
                    remaining -= 1
                    self._retire(w, replace=True)
                elif not w.ready:
                    self._start_failed(w, f"not ready within {self.start_timeout_s:g} s")

    def _reset_busy(self) -> None:
        # A worker still busy from an interrupted earlier call is replaced, not waited for.
        for w in [w for w in self._workers if w.item is not None]:
            w.item = None
            self._retire(w, replace=True)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (they change when a worker is replaced)."""
        return [w.proc.pid for w in self._workers]

    def wait_ready(self) -> None:
        """Block until every worker has started (start-up errors raise RewardPoolError)."""
        if self._broken:
            raise RewardPoolError(self._broken)
        self._reset_busy()
        while not all(w.ready for w in self._workers):
            self._run_remote((), {}, deque(), None, None, until_ready=True)

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for w in list(self._workers):
            self._sel.unregister(w.fd)
            w.close()
        self._workers.clear()
        self._sel.close()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 — interpreter shutdown
            pass
