#!/usr/bin/env python
"""Import a Hugging Face model (Qwen3 / Llama / LLaVA, safetensors) as a torch_dist checkpoint.

    python tools/import_from_hf.py --hf HF_DIR --output DIR [--dtype fp32|bf16|fp16]
        [--tp N --pp M] [--text-only] [--overwrite]

Writes DIR (atomically): the torch_dist shards + copd_meta.json (the model config derived from
config.json), DIR/tokenizer/ (the HF tokenizer, for data.tokenizer) and DIR/copd_model.yaml (the
config snippet: model, data.tokenizer, checkpoint.load). Streams tensor by tensor; no model is
built. A torch_dist checkpoint stores global tensors and loads at any TP/PP, so --tp/--pp only
check that the model can be split that way.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_copd.tool_main import run_tool

PROG = "import_from_hf"
DTYPES = ("fp32", "bf16", "fp16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + "
                   "safetensors)")
    p.add_argument("--output", required=True, help="output checkpoint directory")
    p.add_argument("--dtype", choices=DTYPES, help="stored dtype (default: the HF weights')")
    p.add_argument("--tp", type=int, default=1, help="check the model splits over N TP ranks")
    p.add_argument("--pp", type=int, default=1, help="check the model splits over M PP stages")
    p.add_argument("--text-only", action="store_true",
                   help="import only the language model of a VLM (LLaVA, Qwen3-VL)")
    p.add_argument("--workers", type=int, default=4, help="I/O threads")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        from pathlib import Path

        from megatron_copd.models.conversion.hf_import import (
            import_from_hf,
            read_hf_config,
        )
        from megatron_copd.models.conversion.layout import check_layout
        from megatron_copd.models.precision import TORCH_DTYPES

        _, info = read_hf_config(Path(args.hf), args.text_only)
        check_layout(info.model, args.tp, args.pp)
        return import_from_hf(args.hf, args.output, dtype=TORCH_DTYPES.get(args.dtype),
                              overwrite=args.overwrite, workers=args.workers,
                              text_only=args.text_only)

    return run_tool(PROG, work, lambda result: (
        f"imported {result.architecture} into {result.output}: {result.tensors} tensors, "
        f"{result.bytes_written / 1e9:.3f} GB in {result.seconds:.1f} s; config snippet "
        f"{result.output / 'copd_model.yaml'}"
        + (f"; tokenizer {result.tokenizer}" if result.tokenizer else "; no tokenizer found")
    ))


if __name__ == "__main__":
    sys.exit(main())
