#!/usr/bin/env python
"""Export a torch_dist checkpoint (merged or one branch, any TP/PP) to Hugging Face format.

    python tools/convert_to_hf.py --checkpoint DIR --output HF_DIR [--tokenizer TOK_DIR]
        [--no-tokenizer] [--dtype fp32|bf16|fp16] [--text-only] [--prefix model.] [--max-shard-gb 5]
        [--workers 4] [--overwrite]

Streams tensor by tensor on CPU without building the model; writes safetensors shards +
model.safetensors.index.json, config.json, generation_config.json, tokenizer files (and for a
VLM the image processor config) into a temporary directory renamed to HF_DIR when complete.
--tokenizer defaults to the one recorded with the checkpoint (DIR/tokenizer after an import).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_copd.tool_main import run_tool

PROG = "convert_to_hf"
DTYPES = ("fp32", "bf16", "fp16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="torch_dist checkpoint directory (or a branch directory with 'latest')")
    p.add_argument("--output", required=True, help="output Hugging Face model directory")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="weights and config only (text models; special token ids left unset)")
    p.add_argument("--dtype", choices=DTYPES, help="output dtype (default: the checkpoint's)")
    p.add_argument("--text-only", action="store_true",
                   help="export only the language model of a VLM (as Qwen3 / Llama)")
    p.add_argument("--prefix", help="key prefix of the model in the checkpoint (default: found)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    p.add_argument("--workers", type=int, default=4, help="I/O threads")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        from megatron_copd.models.conversion.hf_export import convert_to_hf
        from megatron_copd.models.precision import TORCH_DTYPES

        return convert_to_hf(
            args.checkpoint, args.output, tokenizer=args.tokenizer,
            with_tokenizer=not args.no_tokenizer, dtype=TORCH_DTYPES.get(args.dtype),
            text_only=args.text_only, prefix=args.prefix,
            max_shard_bytes=int(args.max_shard_gb * (1 << 30)), workers=args.workers,
            overwrite=args.overwrite,
        )

    return run_tool(PROG, work, lambda result: (
        f"exported {result.architecture} to {result.output}: {result.tensors} tensors in "
        f"{result.shards} shard(s), {result.bytes_written / 1e9:.3f} GB in {result.seconds:.1f} s"
    ))


if __name__ == "__main__":
    sys.exit(main())
