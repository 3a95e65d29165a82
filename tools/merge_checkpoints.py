#!/usr/bin/env python
"""Merge branch checkpoints (megatron torch_dist) into one, streaming on CPU.

    python tools/merge_checkpoints.py --inputs A B [C ...] --output OUT [--weights w1 w2 ...]
        [--method average|task_arithmetic --base BASE] [--dtype fp32|bf16|fp16]
        [--overwrite] [--include-optimizer] [--workers N]

average: OUT = sum_k w_k A_k / sum_k w_k (default uniform weights);
task_arithmetic: OUT = BASE + sum_k w_k (A_k - BASE). The output loads at any TP/PP.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_copd.checkpoint.merge import DEFAULT_CHUNK_MB, DTYPES, merge_checkpoints
from megatron_copd.tool_main import run_tool

PROG = "merge_checkpoints"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument(
        "--inputs",
        nargs="+",
        required=True,
        metavar="CKPT",
        help="torch_dist checkpoint directories (branches of one base)",
    )
    p.add_argument("--output", required=True, help="output checkpoint directory")
    p.add_argument(
        "--weights",
        nargs="+",
        type=float,
        metavar="W",
        help="one non-negative weight per input (default: uniform)",
    )
    p.add_argument("--method", choices=["average", "task_arithmetic"], default="average")
    p.add_argument("--base", help="base checkpoint (task_arithmetic)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the inputs')")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument(
        "--include-optimizer",
        action="store_true",
        help="also merge optimizer state (default: model weights only)",
    )
    p.add_argument("--workers", type=int, default=None, help="I/O threads (default: 2-4)")
    p.add_argument(
        "--chunk-mb",
        type=float,
        default=DEFAULT_CHUNK_MB,
        help=f"piece size in MiB of fp32 (default {DEFAULT_CHUNK_MB})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        return merge_checkpoints(
            args.inputs,
            args.output,
            weights=args.weights,
            method=args.method,
            base=args.base,
            dtype=args.dtype,
            overwrite=args.overwrite,
            include_optimizer=args.include_optimizer,
            workers=args.workers,
            chunk_mb=args.chunk_mb,
            progress=not args.no_progress,
        )

    return run_tool(PROG, work, lambda stats: (
        f"merged {len(args.inputs)} checkpoints into {stats.output}: {stats.tensors} tensors, "
        f"{stats.bytes_written / 1e9:.2f} GB written, {stats.bytes_read / 1e9:.2f} GB read in "
        f"{stats.seconds:.2f} s (coefficients {[round(c, 6) for c in stats.coefficients]})"
    ))


if __name__ == "__main__":
    sys.exit(main())
