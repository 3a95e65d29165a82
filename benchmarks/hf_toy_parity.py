#!/usr/bin/env python
"""Export the toy world's base model to Hugging Face and check, with transformers alone, that it
answers the toy eval set like the megatron model: identical greedy tokens and accuracy.

    python benchmarks/hf_toy_parity.py [--items 100] [--class-token] [--out DIR]

The toy base (cached in ~/.cache/megatron-copd, built by a short warm-up the first time) is
loaded into megatron (TP=1, one gloo process) and exported with tools/convert_to_hf.py's library
call. Its ViT has no class token by default, which transformers' CLIP cannot express: the export
is then the language model alone (--text-only) and only the text domain is compared.
``--class-token`` builds (or reuses) a base with ``model.vision.class_token: true`` and compares
the image domain too (the full LLaVA export). Each item: the prompt ids from ``data.prompting``,
greedy decoding to EOS or the budget on both sides (megatron: full-recompute loop over the model's
forward; transformers: ``generate(do_sample=False)`` with its KV cache), verified answers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def megatron_greedy(model, ids: list[int], pixels, max_new: int, eos: int) -> list[int]:
    import torch

    seq = torch.tensor([ids])
    out: list[int] = []
    for _ in range(max_new):
        s = seq.shape[1]
        pos = torch.arange(s).unsqueeze(0)
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1).view(1, 1, s, s)
        with torch.no_grad():
            logits = model(seq, pos, mask, pixels=pixels)
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt == eos:
            break
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return out


def hf_greedy(model, ids: list[int], pixels, max_new: int, eos: int) -> list[int]:
    import torch

    kw = {"pixel_values": pixels} if pixels is not None else {}
    with torch.no_grad():
        gen = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new,
                             do_sample=False, eos_token_id=eos, pad_token_id=eos, **kw)
    return gen[0, len(ids):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=100, help="eval items per domain")
    ap.add_argument("--class-token", action="store_true")
    ap.add_argument("--out", default=None, help="where to write the HF export (default: temp)")
    args = ap.parse_args()

    import torch
    import transformers as T

    from megatron_copd.checkpoint.model_io import load_model
    from megatron_copd.config import load_config
    from megatron_copd.data.prompting import encode_prompt
    from megatron_copd.data.records import load_many
    from megatron_copd.data.toy.vocab import build_toy_tokenizer
    from megatron_copd.training.toy_base import configured_toy_world
    from megatron_copd.models.conversion.hf_export import convert_to_hf
    from megatron_copd.models.factory import build_model
    from megatron_copd.rewards.registry import verifier_spec
    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.distributed import LaunchEnv, free_port, init_distributed
    from megatron_copd.runtime.megatron_state import init_megatron_state
    from megatron_copd.training.toy_base import ensure_toy_base

    init_distributed(LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "local"))
    groups = build_branch_groups(BranchLayout.from_world(("a",), 1, tp=1, pp=1))
    init_megatron_state(groups, 0)  # the memory buffer and RNG the base warm-up needs
    overrides: list[str] = []
    if args.class_token:
        overrides.append("model.vision.class_token=true")
    # The toy config has two branches; the base and this check use one process.
    cfg = load_config(None, overrides, world_size=2)  # the toy config has two branches
    cache = Path(cfg.data.cache_dir or os.environ.get("COPD_CACHE_DIR")
                 or "~/.cache/megatron-copd").expanduser()
    world = configured_toy_world(cfg, cache)
    tok = build_toy_tokenizer(world)
    tok_dir = world.root / "tokenizer"  # where build_toy_tokenizer keeps the default vocabulary
    base = ensure_toy_base(cfg, world, tok, str(tok_dir), cache)
    text_only = not cfg.model.vision.class_token
    out = Path(args.out or tempfile.mkdtemp(prefix="toy-hf-")) / "hf"
    t0 = time.perf_counter()
    exported = convert_to_hf(base, out, tokenizer=tok_dir, text_only=text_only,
                             overwrite=True)
    print(f"toy base {base} -> {exported.architecture} at {out} in "
          f"{time.perf_counter() - t0:.1f} s{' (language model only)' if text_only else ''}")

    cfg1 = load_config(None, overrides + ["branches=[{name: a}]"], world_size=1)
    mine = build_model(cfg1, groups.pgs, image_token_id=tok.image_token_id).eval()
    load_model(mine, groups.pgs, base)
    cls = T.AutoModelForCausalLM if text_only else T.LlavaForConditionalGeneration
    theirs = cls.from_pretrained(str(out), dtype=torch.float32).eval()
    max_new = cfg.grpo.max_new_tokens
    for domain in ["text"] if text_only else ["text", "image"]:
        records = load_many([world.path(domain, "eval")])[: args.items]
        same = correct_m = correct_h = 0
        t_m = t_h = 0.0
        for r in records:
            enc = encode_prompt(r, tok, cfg.model.vision_side, cfg.data.max_prompt_tokens)
            t = time.perf_counter()
            a = megatron_greedy(mine, enc.token_ids, enc.pixels, max_new, tok.eos_id)
            t_m += time.perf_counter() - t
            t = time.perf_counter()
            b = hf_greedy(theirs, enc.token_ids, enc.pixels, max_new, tok.eos_id)
            t_h += time.perf_counter() - t
            same += a == b
            verify = verifier_spec(r.reward or cfg.grpo.default_verifier).fn
            correct_m += verify(tok.decode(a), r.answer)
            correct_h += verify(tok.decode(b), r.answer)
        n = len(records)
        print(f"{domain}: {n} items, identical greedy answers {same}/{n}; accuracy megatron "
              f"{correct_m / n:.3f}, transformers {correct_h / n:.3f}; time megatron (no cache) "
              f"{t_m:.1f} s, transformers generate {t_h:.1f} s")


if __name__ == "__main__":
    main()
