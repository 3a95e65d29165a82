"""Held-out accuracy: greedy decoding with the branch's model-parallel forward, verified answers.

Each DP rank of a branch takes its share of a domain's items; the counts are summed over the DP
group, so every rank returns the same accuracy. Besides the domain's accuracy, the accuracy of
every slice named by a record's ``meta`` fields in SLICE_FIELDS (``task=colour``,
``phrasing=2``, ...): where a gain comes from.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_copd.data.prompting import encode_prompt
from megatron_copd.rollout import inputs
from megatron_copd.rollout.generation import generate
from megatron_copd.rollout.sampling import SamplingParams


SLICE_FIELDS = ("task", "phrasing")


def _slices(record) -> list[str]:
    return [f"{k}={record.meta[k]}" for k in SLICE_FIELDS if k in record.meta]


def evaluate_domain(cfg, groups, model, tokenizer, rewards, records, encode_cache=None) -> dict:
    """Accuracy (mean verifier reward) of greedy answers on ``records``: ``{"accuracy", "items",
    "slices": {"task=colour": accuracy, ...}}``."""
    dp_rank, dp_size = groups.dp_rank, groups.pgs.dp.size()
    mine = records[dp_rank::dp_size]
    cache = {} if encode_cache is None else encode_cache
    names = sorted({n for r in records for n in _slices(r)})  # the same on every rank
    row = {n: i + 1 for i, n in enumerate(names)}
    correct = torch.zeros(len(names) + 1, 2, dtype=torch.float64)  # [sum of rewards, count]
    stop = (tokenizer.eos_id,)
    batch = max(1, cfg.eval.batch_size)
    for start in range(0, len(mine), batch):
        chunk = mine[start : start + batch]
        enc = []
        for r in chunk:
            key = (r.domain, r.id)
            if key not in cache:
                cache[key] = encode_prompt(
                    r, tokenizer, cfg.model.vision_side, cfg.data.max_prompt_tokens
                )
            enc.append(cache[key])
        pixels = [e.pixels for e in enc if e.pixels is not None]
        ro = generate(
            model,
            groups.pgs,
            [e.token_ids for e in enc],
            SamplingParams(max_new_tokens=cfg.grpo.max_new_tokens, temperature=0.0,
                           stop_ids=stop),
            pixels=inputs.concat_media(pixels),
            kv_batch_size=batch,
            pad_id=tokenizer.pad_id,
        )
        if groups.pgs.mp.rank() == 0:
            items = []
            for rec, resp in zip(chunk, ro.responses()):
                text = tokenizer.decode([t for t in resp if t not in stop])
                items.append((rec.reward or cfg.grpo.default_verifier, text, rec.answer))
            result = rewards.score(items)
            for rec, reward in zip(chunk, result.rewards):
                for i in [0] + [row[n] for n in _slices(rec)]:
                    correct[i, 0] += reward
                    correct[i, 1] += 1
    # Only mp-rank 0 counted; sum over the branch (mp x dp) gives the DP total exactly once.
    dist.all_reduce(correct, group=groups.branch_group)
    acc = (correct[:, 0] / correct[:, 1].clamp(min=1)).tolist()
    return {
        "accuracy": acc[0],
        "items": int(correct[0, 1]),
        "slices": {n: acc[row[n]] for n in names},
    }
