"""Reward pool throughput: measured items/s for each path, side by side in one run.

    PYTHONPATH=. python benchmarks/reward_pool.py [--items 2048] [--workers 2]

Prints: worker start-up time (to ready), math items/s through the pool, cheap verifiers
(exact/choice/numeric) inline vs forced through the workers, and math in-process (reference).
"""

from __future__ import annotations

import argparse
import random
import time

from megatron_copd.rewards import RewardPool, get_verifier


def make_items(n: int, seed: int = 0) -> dict[str, list[tuple[str, str, str]]]:
    rng = random.Random(seed)
    math_items, cheap = [], []
    for _ in range(n):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        gold = a + b
        guess = gold if rng.random() < 0.5 else gold + rng.randint(1, 5)
        style = rng.randrange(3)
        if style == 0:
            resp = f"We add {a} and {b}. The answer is \\boxed{{{guess}}}."
        elif style == 1:
            resp = f"{a} + {b} = {guess}\nAnswer: {guess:,}"
        else:
            frac = f"\\frac{{{2 * guess}}}{{2}}"
            resp = f"Half of it is {guess / 2}, so \\boxed{{{frac}}}"
        math_items.append(("math", resp, str(gold)))
        letter = "ABCD"[rng.randrange(4)]
        cheap.append(("choice", f"Thinking... the answer is ({letter}).", "B"))
        cheap.append(("numeric", resp, str(gold)))
        cheap.append(("exact", f"Answer: {guess}", str(gold)))
    return {"math": math_items, "cheap": cheap[:n]}


def rate(fn, items) -> tuple[float, float]:
    t0 = time.perf_counter()
    res = fn(items)
    dt = time.perf_counter() - t0
    return len(items) / dt, sum(res.rewards) / max(len(items), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    items = make_items(args.items)

    t0 = time.perf_counter()
    pool = RewardPool(num_workers=args.workers, timeout_s=5.0)
    pool.wait_ready()
    print(f"worker start-up ({args.workers} workers, to ready): {time.perf_counter() - t0:.2f} s")
    with pool:
        r, acc = rate(pool.score, items["math"])
        print(f"math via pool:            {r:9.0f} items/s   (mean reward {acc:.3f})")
        r, acc = rate(pool.score, items["cheap"])
        print(f"cheap verifiers inline:   {r:9.0f} items/s   (mean reward {acc:.3f})")
    with RewardPool(num_workers=args.workers, timeout_s=5.0, inline_fast_path=False) as slow:
        slow.wait_ready()
        r, acc = rate(slow.score, items["cheap"])
        print(f"cheap verifiers via pool: {r:9.0f} items/s   (mean reward {acc:.3f})")
    fn = get_verifier("math")
    fn("1", "1")  # import math-verify before timing
    t0 = time.perf_counter()
    for _, resp, ans in items["math"]:
        fn(resp, ans)
    r = len(items["math"]) / (time.perf_counter() - t0)
    print(f"math in-process (1 core): {r:9.0f} items/s")


if __name__ == "__main__":
    main()
