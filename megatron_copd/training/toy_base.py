"""The toy world's base model: a short supervised warm-up of a random model on a mixture of the
toy domains (their warm-up split if the world has one, else the train split), so that it solves
part of every domain and RL has signal.

Built once per (model shape, toy world, tokenizer, warm-up settings) and cached as a torch_dist
checkpoint; concurrent runs wait for the one that builds it. Every rank of the world takes part as
one data-parallel group (the branches do not exist yet) on the same global batches whatever the
world size, but the floating-point reduction order differs with the number of ranks, and the toy
VLM's visual learning sits on a plateau that amplifies such differences: a base built by one
process and one built by two are statistically alike, not equal (measured on the earlier default
world: image 49.6 % vs 61.8 % held-out). The first build on a machine is cached and every later
run reuses it. Its seed is ``data.base_seed``, not the run seed: runs with different seeds
(``copd compare``) start from one base, as the paper's branches start from one model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_copd.checkpoint.model_io import META_FILE, save_model
from megatron_copd.config import RunConfig, to_dict
from megatron_copd.config_base import from_dict
from megatron_copd.data.prompting import encode_prompt, encode_response
from megatron_copd.data.records import load_many
from megatron_copd.data.sampler import MixedSampler, PromptSampler
from megatron_copd.rollout.positions import position_ids
from megatron_copd.data.toy.world import DOMAINS
from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
from megatron_copd.runtime.megatron_state import init_megatron_state
from megatron_copd.training.losses import sft_loss
from megatron_copd.training.samples import SampleSet, build_micro_batches


def configured_toy_world(cfg: RunConfig, cache_dir: Path):
    """The toy world a run config names (built once and cached)."""
    from megatron_copd.data.toy.world import build_toy_world

    knobs = to_dict(cfg.data.toy)
    if knobs["warmup_size"] is None:
        knobs["warmup_size"] = cfg.data.train_size
    return build_toy_world(cache_dir, seed=cfg.data.base_seed, train_size=cfg.data.train_size,
                           eval_size=cfg.data.eval_size, **knobs)


def base_key(cfg: RunConfig, world, tokenizer_dir: str) -> str:
    d = cfg.data
    model = to_dict(cfg.model)
    if model.get("qwen_vl") is None:  # bases cached before the section existed keep their key
        model.pop("qwen_vl", None)
    spec = {
        "model": model,
        "world": str(world.root.name),
        "tokenizer": Path(tokenizer_dir).name,
        "warmup": [d.base_seed, d.base_warmup_steps, d.base_warmup_batch, d.base_warmup_lr],
        "version": 1,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def ensure_toy_base(cfg: RunConfig, world, tokenizer, tokenizer_dir: str, cache_dir: Path,
                    log=print) -> Path:
    """Return the cached base checkpoint, building it collectively if it is missing."""
    path = cache_dir / f"base-{base_key(cfg, world, tokenizer_dir)}"
    ready = torch.tensor([1 if (path / META_FILE).is_file() else 0])
    dist.all_reduce(ready, op=dist.ReduceOp.MIN)  # every rank must agree before building
    if int(ready):
        return path
    t0 = time.perf_counter()
    build_cfg = from_dict(RunConfig, {
        **to_dict(cfg),
        "branches": [{"name": "base", "domains": list(DOMAINS)}],
        "parallel": {"tp": 1, "pp": 1},
        "optim": {"lr": cfg.data.base_warmup_lr, "lr_schedule": "cosine",
                  "min_lr": cfg.data.base_warmup_lr * 0.1,
                  "warmup_steps": min(20, cfg.data.base_warmup_steps // 10), "clip_grad": 1.0},
    })
    world_size = dist.get_world_size()
    layout = BranchLayout(("base",), dp=world_size)
    groups = build_branch_groups(layout)
    init_megatron_state(groups, cfg.data.base_seed)
    from megatron_copd.training.branch_model import BranchModel

    steps = cfg.data.base_warmup_steps
    model = BranchModel(build_cfg, groups, tokenizer.image_token_id, total_steps=steps)
    samplers = {
        d: PromptSampler(load_many([world.path(d, world.base_split)]), cfg.data.base_seed + i)
        for i, d in enumerate(DOMAINS)
    }
    mixed = MixedSampler(samplers, mode="round_robin")
    loss = sft_loss(groups.pgs.tp)
    per_rank = max(1, cfg.data.base_warmup_batch // world_size)
    cache: dict = {}
    for step in range(steps):
        records = mixed.next_batch(per_rank * world_size)
        mine = records[groups.dp_rank * per_rank : (groups.dp_rank + 1) * per_rank]
        samples = SampleSet()
        for r in mine:
            if r.id not in cache:
                enc = encode_prompt(r, tokenizer, cfg.model.vision_side,
                                    cfg.data.max_prompt_tokens)
                cache[r.id] = (enc, encode_response(r.answer, tokenizer))
            enc, resp = cache[r.id]
            samples.prompts.append(enc.token_ids)
            samples.responses.append(resp)
            samples.old_logp.append(torch.zeros(len(resp)))
            samples.advantages.append(torch.zeros(len(resp)))
            samples.pixels.append(enc.pixels)
        batches, seq_len = build_micro_batches(samples, per_rank, tokenizer.pad_id,
                                               positions=partial(position_ids, model.model))
        result = model.train_step(batches, loss, seq_len)
        if (step + 1) % 50 == 0 or step == 0:
            log(f"toy base warm-up {step + 1}/{steps}: loss {result.metrics.get('loss', 0):.3f}, "
                f"grad norm {result.grad_norm or 0:.2f}")
    meta = {"kind": "toy-base", "model": to_dict(cfg.model), "warmup_steps": steps,
            "tokenizer": str(tokenizer_dir), "base_fingerprint": None}
    # One private name for this build (agreed by all ranks), renamed into place when complete:
    # a concurrent run building the same base cannot interleave with this one.
    name = [f"{path.name}.build-{os.getpid()}"]
    dist.broadcast_object_list(name, src=0)
    tmp_name = path.with_name(name[0])
    save_model(model.model, groups.pgs, tmp_name, meta)
    if dist.get_rank() == 0:
        if (path / META_FILE).is_file():
            shutil.rmtree(tmp_name, ignore_errors=True)
        else:
            os.replace(tmp_name, path)
        log(f"toy base built in {time.perf_counter() - t0:.0f} s: {path}")
    dist.barrier()
    return path
