#!/usr/bin/env python
"""Convert a real dataset into prompt records (JSONL) for branches' train_data / eval_data.

    python tools/prepare_data.py math    SRC.{jsonl,parquet} --output OUT.jsonl [--domain math]
    python tools/prepare_data.py image   SRC.{jsonl,parquet} --output OUT.jsonl [--media-dir D]
    python tools/prepare_data.py video   SRC.{jsonl,parquet} --output OUT.jsonl [--media-dir D]
    python tools/prepare_data.py energon DATASET_DIR        --output OUT.jsonl [--split train]

Common options: --limit N, --id-prefix P, --reward NAME (image/video/energon: the verifier for
free-form answers; multiple-choice rows always use 'choice'). Embedded media are written under
--media-dir (default: OUT's directory / <OUT stem>_media). The output is written atomically and
validated by loading it back.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_copd.errors import UserError  # noqa: E402

PROG = "prepare_data"
DEFAULT_DOMAIN = {"math": "math", "image": "image", "video": "video", "energon": "image"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=sorted(DEFAULT_DOMAIN))
    p.add_argument("src")
    p.add_argument("--output", required=True)
    p.add_argument("--domain")
    p.add_argument("--media-dir")
    p.add_argument("--reward")
    p.add_argument("--id-prefix")
    p.add_argument("--limit", type=int)
    p.add_argument("--split", default="train", help="energon split part")
    args = p.parse_args(argv)
    from megatron_copd.data import real

    domain = args.domain or DEFAULT_DOMAIN[args.kind]
    common = {"domain": domain, "id_prefix": args.id_prefix, "limit": args.limit}
    try:
        if args.kind == "math":
            n = real.convert_math(args.src, args.output, **common)
        elif args.kind == "image":
            n = real.convert_image_qa(args.src, args.output, args.media_dir, reward=args.reward,
                                      **common)
        elif args.kind == "video":
            n = real.convert_video_qa(args.src, args.output, args.media_dir, reward=args.reward,
                                      **common)
        else:
            n = real.convert_energon(args.src, args.output, args.media_dir, reward=args.reward,
                                     split_part=args.split, **common)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} {domain} records to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
