"""Time the toy world: cold generation at the default sizes, cache hits, the tokenizer, and
prompt encoding. Prints measured figures (not a test).

    PYTHONPATH=$PWD python benchmarks/toy_world.py [--train 4000 --eval 500 --seed 1234]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--eval", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    t0 = time.perf_counter()
    import megatron.core.tokenizers  # noqa: F401  (imported by the tokenizer; timed apart)

    from megatron_copd.config import VisionConfig
    from megatron_copd.data.prompting import encode_prompt
    from megatron_copd.data.toy import build_toy_tokenizer, build_toy_world

    print(f"imports: {time.perf_counter() - t0:.2f} s")
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        world = build_toy_world(cache, args.seed, args.train, args.eval)
        cold = time.perf_counter() - t
        hits = []
        for _ in range(20):
            t = time.perf_counter()
            build_toy_world(cache, args.seed, args.train, args.eval)
            hits.append(time.perf_counter() - t)
        files = [p for p in Path(world.root).rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        blocks = sum(p.stat().st_blocks * 512 for p in files)
        print(f"world {world.root.name}: train {args.train} / eval {args.eval} per domain")
        print(
            f"  cold generation: {cold:.2f} s ({len(files)} files, {size / 2**20:.1f} MiB "
            f"content, {blocks / 2**20:.1f} MiB on disk)"
        )
        print(
            f"  cache hit: median {statistics.median(hits) * 1e3:.3f} ms, "
            f"max {max(hits) * 1e3:.3f} ms over {len(hits)} calls"
        )

        t = time.perf_counter()
        tok = build_toy_tokenizer(world)
        cold_tok = time.perf_counter() - t
        t = time.perf_counter()
        build_toy_tokenizer(world)
        print(
            f"tokenizer: train {cold_tok:.2f} s, cache hit {(time.perf_counter() - t) * 1e3:.1f}"
            f" ms, vocab {tok.vocab_size}"
        )

        vision = VisionConfig()
        for domain in world.domains:
            rows = list(world.iter_rows(domain, "eval"))
            base = world.path(domain, "eval").parent
            t = time.perf_counter()
            enc = [encode_prompt(r, tok, vision, 256, base_dir=base) for r in rows]
            dt = time.perf_counter() - t
            lens = [len(e.token_ids) for e in enc]
            print(
                f"encode {domain}: {len(rows) / dt:.0f} prompts/s, prompt tokens mean "
                f"{statistics.mean(lens):.1f} max {max(lens)}"
            )
    print(f"cpu cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
