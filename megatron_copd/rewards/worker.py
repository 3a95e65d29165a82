"""Reward worker process: ``python -m megatron_copd.rewards.worker '<json list of modules>'``.

Protocol (one JSON object per line): the worker writes ``{"ready": true}`` once its imports are
done (or ``{"fatal": "..."}`` and exits), then answers each request
``{"i": n, "v": verifier, "m": module, "r": response, "a": answer}`` with ``{"i": n, "x": reward}``
or ``{"i": n, "e": "ExceptionType: message"}``. End of input ends the worker.

The replies go to a private copy of the original stdout; fd 1 is pointed at stderr so a verifier
that prints cannot corrupt the protocol. The worker runs verifiers in its main thread (math-verify
uses signal.alarm), ignores SIGINT (the training process decides when workers stop) and exits if
its parent disappears.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import sys
import threading
import time


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(3)


def _reply(out, obj: dict) -> None:
    out.write((json.dumps(obj) + "\n").encode("utf-8"))
    out.flush()


def _score(registry, req: dict) -> dict:
    name, module = req["v"], req.get("m")
    try:
        try:
            spec = registry.verifier_spec(name)
        except registry.UnknownVerifierError:
            if not module or module == "__main__":
                raise
            importlib.import_module(module)  # registers it
            spec = registry.verifier_spec(name)
        value = float(spec.fn(req["r"], req["a"]))
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"verifier {name!r} returned {value}, expected a number in [0, 1]")
        return {"i": req["i"], "x": value}
    except BaseException as e:  # noqa: BLE001 — anything a verifier does is the verifier's error
        if isinstance(e, KeyboardInterrupt):
            raise
        msg = str(e).replace("\n", " ")[:300]
        return {"i": req["i"], "e": f"{type(e).__name__}: {msg}"}


def main(argv: list[str]) -> int:
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    try:
        from megatron_copd.rewards import registry
        import megatron_copd.rewards.builtin  # noqa: F401 — registers the built-ins

        for mod in json.loads(argv[0]) if argv else []:
            importlib.import_module(mod)
        # Import math-verify (sympy) before saying ready, so its ~0.5 s start-up is not charged
        # to the first item's time limit.
        import math_verify  # noqa: F401
    except BaseException as e:  # noqa: BLE001
        _reply(out, {"fatal": f"{type(e).__name__}: {e}".replace("\n", " ")})
        return 2
    _reply(out, {"ready": True, "pid": os.getpid()})
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        _reply(out, _score(registry, json.loads(line)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
