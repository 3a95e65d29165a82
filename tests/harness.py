"""Run a test function on N gloo worker processes and collect what each returns.

    results = run_world(my_worker, world_size=4, args=(...))

``my_worker(rank, world_size, *args)`` must be a module-level function (it is pickled into
spawned processes). torch.distributed is initialised before it runs (gloo, CPU compatibility
layer on); whatever it returns is pickled back, indexed by rank. An exception in any worker
fails the call with that worker's traceback.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback

import torch.multiprocessing as mp

from megatron_copd.runtime.distributed import LaunchEnv, free_port, init_distributed, shutdown


def _entry(rank, world_size, port, out_dir, fn, args):
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    result = None
    try:
        init_distributed(LaunchEnv(rank, world_size, rank, "127.0.0.1", port, "local"))
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        result = ("error", traceback.format_exc())
    finally:
        with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        shutdown()


def run_world(fn, world_size: int, args: tuple = (), timeout: float = 600) -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _entry,
            args=(world_size, free_port(), out_dir, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    break
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results, errors = [], []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"{rank}.pkl")
            if not os.path.exists(path):
                errors.append(f"worker {rank} produced no result (crashed or timed out)")
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"worker {rank} failed:\n{value}")
            results.append(value)
        if errors:
            # A crash on one rank shows up as "connection closed" on the others: list them all.
            raise RuntimeError("\n".join(errors))
        return results
