#!/usr/bin/env python
"""Check a Hugging Face export against the checkpoint it came from: greedy answers on held-out items.

    python tools/check_export.py --config RUN/config.yaml --checkpoint RUN/merged --hf HF_DIR
        [--domain image] [--items 100] [--max-new-tokens 8] [key=value ...]

Runs the checkpoint with this project's rollout (KV cache, batched) and the export with
transformers' ``generate``, both greedy on the first ITEMS held-out items of DOMAIN, and prints
how many answers are equal token for token. Exit 0 when all are, 1 otherwise. Text and Qwen-VL
models, single process on CPU.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_copd.tool_main import run_tool

PROG = "check_export"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the run's config (RUN/config.yaml)")
    p.add_argument("--checkpoint", required=True, help="torch_dist checkpoint (RUN/merged)")
    p.add_argument("--hf", required=True, help="the exported Hugging Face directory")
    p.add_argument("--domain", default="image", help="held-out domain (default: image)")
    p.add_argument("--items", type=int, default=100, help="items to compare (default: 100)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    state = {}

    def work():
        from megatron_copd.models.conversion.export_check import check_export

        state["r"] = check_export(args.config, args.checkpoint, args.hf, args.domain,
                                  args.items, args.max_new_tokens, tuple(args.overrides))
        return state["r"]

    def report(r) -> str:
        lines = [f"greedy answers equal on {r.equal}/{r.items} held-out {r.domain} items "
                 f"({r.answered} of megatron's answers longer than an immediate end)"]
        lines += [f"  item {i}: megatron {a} vs transformers {b}" for i, a, b in r.mismatches]
        return "\n".join(lines)

    code = run_tool(PROG, work, report)
    return code if code or state["r"].ok else 1


if __name__ == "__main__":
    sys.exit(main())
