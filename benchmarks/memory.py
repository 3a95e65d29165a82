"""Peak memory of one training step on CPU, above the resident weights, gradients and optimizer
state, at growing sequence lengths, next to ``copd check``'s memory model for the same shapes.

    PYTHONPATH=. python benchmarks/memory.py [--lengths 512 1024 2048 4096] [--threads 1]
                                             [--repeats 3]

Each length runs in a fresh process: a ~30M-parameter text LM (hidden 512, 8 layers, 8 heads /
4 KV heads, FFN 1536, vocab 8192, fp32), one GRPO update on one row of T tokens (T/2 prompt,
T/2 response) through ``BranchModel.train_step`` after a warm-up step at T = 64 (which
allocates the gradient buffers and Adam state). The peak is the process's high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs`` just before the step) minus its resident
size then (median of --repeats fresh processes; large blocks come from mmap, so freed memory
is returned at once). The prediction is ``memory_model(cfg, assume_cuda=False)``'s training
phase.
Prints the table and the ratio of successive doublings (linear growth: about 2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"vocab_size": 8192, "hidden_size": 512, "num_layers": 8, "num_attention_heads": 8,
         "num_query_groups": 4, "ffn_hidden_size": 1536, "max_sequence_length": 8192}
MiB = 2**20


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def config(t: int):
    from megatron_copd.config import RunConfig
    from megatron_copd.config_base import from_dict

    return from_dict(RunConfig, {
        "branches": [{"name": "bench", "domains": ["text"]}], "model": MODEL,
        "precision": {"dtype": "fp32"},
        "data": {"max_prompt_tokens": t // 2},
        "grpo": {"max_new_tokens": t - t // 2, "micro_batch_size": 1},
    })


def measure(t: int, threads: int) -> dict:
    """One length, in this process."""
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(threads)
    from megatron_copd.memory_model import memory_model
    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.distributed import LaunchEnv, free_port, init_distributed
    from megatron_copd.runtime.megatron_state import init_megatron_state
    from megatron_copd.training.branch_model import BranchModel
    from megatron_copd.training.losses import policy_loss
    from megatron_copd.training.samples import SampleSet, build_micro_batches

    init_distributed(LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    cfg = config(t)
    groups = build_branch_groups(BranchLayout(("bench",)))
    init_megatron_state(groups, 1)
    branch = BranchModel(cfg, groups, image_token_id=None, total_steps=10)
    loss = policy_loss(groups.pgs.tp, 0.2, 0.28)
    g = torch.Generator().manual_seed(0)

    def step(n: int):
        s = SampleSet()
        p = n // 2
        s.prompts.append(torch.randint(10, 8192, (p,), generator=g).tolist())
        s.responses.append(torch.randint(10, 8192, (n - p,), generator=g).tolist())
        s.old_logp.append(-torch.rand(n - p, generator=g))
        s.advantages.append(torch.randn(n - p, generator=g))
        s.pixels.append(None)
        batches, width = build_micro_batches(s, 1, 0)
        branch.train_step(batches, loss, width)

    step(64)  # gradient buffers and Adam state exist from here on
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    before = _status("VmRSS")
    step(t)
    peak = _status("VmHWM") - before
    predicted = memory_model(cfg, assume_cuda=False).phases[0]
    return {"T": t, "measured": peak, "predicted": predicted.bytes,
            "terms": {term.name: term.bytes for term in predicted.terms}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="runs per length (median)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # run one length, print JSON
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a.threads)))
        return
    # Large blocks straight from mmap: freed memory leaves the process at once, so the
    # high-water mark follows what is live rather than what malloc keeps cached.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    rows = []
    for t in a.lengths:
        runs = []
        for _ in range(a.repeats):
            out = subprocess.run([sys.executable, __file__, "--one", str(t), "--threads",
                                  str(a.threads)], capture_output=True, text=True, check=True,
                                 env=env)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows.append(sorted(runs, key=lambda r: r["measured"])[len(runs) // 2])  # the median
    print(f"{'T':>6} {'measured MiB':>13} {'predicted MiB':>14} {'meas/pred':>10} "
          f"{'growth':>7}")
    prev = None
    for r in rows:
        growth = f"{r['measured'] / prev:.2f}" if prev else "-"
        print(f"{r['T']:>6} {r['measured'] / MiB:>13.1f} {r['predicted'] / MiB:>14.1f} "
              f"{r['measured'] / r['predicted']:>10.2f} {growth:>7}")
        prev = r["measured"]
    print("predicted terms at the longest length (MiB):",
          {k: round(v / MiB, 1) for k, v in rows[-1]["terms"].items()})


if __name__ == "__main__":
    main()
