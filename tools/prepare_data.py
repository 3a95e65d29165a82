#!/usr/bin/env python
"""Convert a real dataset into prompt records (JSONL) for branches' train_data / eval_data.

    python tools/prepare_data.py math    SRC.{jsonl,json,parquet} --output OUT.jsonl
    python tools/prepare_data.py image   SRC.{jsonl,json,parquet} --output OUT.jsonl
    python tools/prepare_data.py video   SRC.{jsonl,json,parquet} --output OUT.jsonl
    python tools/prepare_data.py energon DATASET_DIR             --output OUT.jsonl [--split train]

The published layouts of the paper's datasets are recognised without flags (docs/DATA.md).
Options: --domain D, --limit N (records), --id-prefix P, --reward NAME (the verifier of
free-form answers; default math for numbers and expressions, exact for words; multiple choice
always uses 'choice'), --question-field / --answer-field / --options-field / --image-field /
--video-field / --id-field COLUMN, --media-root DIR (relative media paths resolve against it;
default: SRC's directory), --where COLUMN=VALUE (keep matching rows; repeatable), --strict
(refuse the first bad row instead of skipping it). Embedded media are written under
--media-dir (default: OUT's directory / <OUT stem>_media). Rows that cannot become records are
skipped and counted, one summary line per reason. The output is written atomically and
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
FIELDS = ("question", "answer", "options", "image", "video", "id")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=sorted(DEFAULT_DOMAIN))
    p.add_argument("src")
    p.add_argument("--output", required=True)
    p.add_argument("--domain")
    p.add_argument("--media-dir")
    p.add_argument("--media-root")
    p.add_argument("--reward")
    p.add_argument("--id-prefix")
    p.add_argument("--limit", type=int)
    p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE")
    p.add_argument("--strict", action="store_true")
    for f in FIELDS:
        p.add_argument(f"--{f}-field", metavar="COLUMN")
    p.add_argument("--split", default="train", help="energon split part")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_copd.data import real

    domain = args.domain or DEFAULT_DOMAIN[args.kind]
    common = {"domain": domain, "id_prefix": args.id_prefix, "limit": args.limit}
    fields = {f: getattr(args, f"{f}_field") for f in FIELDS if getattr(args, f"{f}_field")}
    try:
        filters = dict(_filter(w) for w in args.where)
        if args.kind == "math":
            report = real.convert_math(args.src, args.output, problem_field=fields.get("question"),
                                       answer_field=fields.get("answer"), strict=args.strict,
                                       **common)
        elif args.kind in ("image", "video"):
            convert = real.convert_image_qa if args.kind == "image" else real.convert_video_qa
            report = convert(args.src, args.output, args.media_dir, reward=args.reward,
                             fields=fields, media_root=args.media_root, where_filters=filters,
                             strict=args.strict, **common)
        else:
            report = real.convert_energon(args.src, args.output, args.media_dir,
                                          reward=args.reward, split_part=args.split, **common)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(report.lines(domain, args.output)))
    return 0


def _filter(text: str) -> tuple[str, str]:
    from megatron_copd.errors import DataError

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise DataError(f"--where {text!r}: expected COLUMN=VALUE")
    return key, value


if __name__ == "__main__":
    sys.exit(main())
