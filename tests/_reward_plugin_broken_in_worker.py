"""A plugin that imports in the training process but fails in a reward worker (start-up test)."""

import __main__

if getattr(__main__, "__file__", "").endswith("worker.py"):
    raise RuntimeError("this plugin cannot load in a worker")
