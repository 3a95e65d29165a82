"""Does a Hugging Face export answer like the checkpoint it was exported from?

Greedy answers of the megatron checkpoint (this project's rollout ``generate``: KV cache, one
left-padded batch) and of the exported directory (transformers' ``generate``, one item at a
time) on a run's held-out items, token for token. Text models and Qwen-VL models; the item's
prompt (and image / video patches) are encoded once, by this project, and fed to both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_copd.config import ConfigError, RunConfig, load_config


@dataclass
class ExportCheck:
    domain: str
    items: int
    equal: int
    mismatches: list[tuple[int, list[int], list[int]]] = field(default_factory=list)
    """(item index, megatron's tokens, transformers' tokens) of the first few differences."""
    answered: int = 0
    """Items whose answer is more than an immediate end of sequence."""

    @property
    def ok(self) -> bool:
        return self.equal == self.items


def check_export(config: str | Path, checkpoint: str | Path, hf_dir: str | Path,
                 domain: str = "image", items: int = 100, max_new_tokens: int = 8,
                 overrides: tuple[str, ...] = ()) -> ExportCheck:
    """Run both models on the first ``items`` held-out items of ``domain`` of the run config
    ``config`` (the run directory's ``config.yaml``): single process, CPU, fp32."""
    cfg = load_config(config, [*overrides, f"branches=[{{name: {domain}, domains: [{domain}]}}]",
                               "parallel.tp=1", "parallel.pp=1", "precision.dtype=fp32"],
                      world_size=1, check_device=False)
    if cfg.model.vision is not None:
        raise ConfigError("model.vision: the export check covers text and Qwen-VL models (a "
                          "LLaVA export feeds transformers' CLIP preprocessing, not ours)")
    prompts, media, ours, eos = _megatron(cfg, str(checkpoint), domain, items, max_new_tokens)
    theirs = _transformers(Path(hf_dir), cfg, prompts, media, eos, max_new_tokens)
    out = ExportCheck(domain, len(prompts), 0)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        out.answered += len(a) > 1
        if a == b:
            out.equal += 1
        elif len(out.mismatches) < 5:
            out.mismatches.append((i, a, b))
    return out


def _megatron(cfg: RunConfig, checkpoint: str, domain: str, items: int, max_new_tokens: int):
    import torch.distributed as dist

    from megatron_copd.checkpoint.model_io import load_model
    from megatron_copd.data.prompting import encode_prompt
    from megatron_copd.models.factory import build_model
    from megatron_copd.rollout import inputs
    from megatron_copd.rollout.generation import generate
    from megatron_copd.rollout.sampling import SamplingParams
    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.distributed import init_distributed
    from megatron_copd.runtime.megatron_state import init_megatron_state
    from megatron_copd.training.run import Resources

    started = not dist.is_initialized()
    init_distributed()
    try:
        res = Resources(cfg)
        groups = build_branch_groups(BranchLayout.from_world((domain,), 1, tp=1, pp=1))
        init_megatron_state(groups, cfg.seed)
        model = build_model(cfg, groups.pgs).eval()
        load_model(model, groups.pgs, checkpoint)
        recs = res.sources.eval.get(domain, [])[:items]
        if not recs:
            raise ConfigError(f"branches: the run has no held-out {domain!r} items")
        enc = [encode_prompt(r, res.tokenizer, cfg.model.vision_side, cfg.data.max_prompt_tokens)
               for r in recs]
        eos = res.tokenizer.eos_id
        ro = generate(model, groups.pgs, [e.token_ids for e in enc],
                      SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                     stop_ids=(eos,)),
                      pixels=inputs.concat_media([e.pixels for e in enc]),
                      kv_batch_size=cfg.eval.batch_size, pad_id=res.tokenizer.pad_id)
        return [e.token_ids for e in enc], [e.pixels for e in enc], ro.responses(), eos
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def _transformers(hf_dir: Path, cfg: RunConfig, prompts, media, eos: int,
                  max_new_tokens: int) -> list[list[int]]:
    import transformers as T

    q = cfg.model.qwen_vl
    cls = T.AutoModelForImageTextToText if q is not None else T.AutoModelForCausalLM
    model = cls.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    out = []
    for ids, m in zip(prompts, media):
        x = torch.tensor([ids])
        kw = {}
        suppress = None
        if q is not None:
            types = torch.zeros_like(x)
            types[x == q.image_token_id] = 1
            types[x == q.video_token_id] = 2
            kw["mm_token_type_ids"] = types
            suppress = [q.image_token_id, q.video_token_id]
            if m is not None:
                kw.update({k: getattr(m, k) for k in ("pixel_values", "image_grid_thw",
                                                      "pixel_values_videos", "video_grid_thw")
                           if getattr(m, k) is not None})
        with torch.no_grad():
            gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos, suppress_tokens=suppress,
                                 **kw)
        got = gen[0, len(ids):].tolist()
        out.append(got[:got.index(eos) + 1] if eos in got else got)
    return out
