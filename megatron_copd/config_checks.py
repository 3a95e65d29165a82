"""The domain of every numeric run-config field, in one table, checked before anything starts.

``CONSTRAINTS`` maps a field's dotted name (``branches[].beta`` for list items) to a
:class:`Bound`; :func:`check_ranges` walks a RunConfig and raises one ConfigError naming the
first value outside its field's domain (``optim.lr: expected > 0, got -1.0``). Cross-field
rules (divisibility, edges naming branches, ...) stay in ``config.validate``, which calls this
first. ``tests/test_config_checks.py`` fails when a numeric field has no entry here.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from megatron_copd.config_base import ConfigError


@dataclass(frozen=True)
class Bound:
    """``lo <= value <= hi`` (``<`` where open); None: unbounded on that side."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return (f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}"
                    f"{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return "a finite number"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


ANY = Bound()  # any finite value (e.g. a seed offset, keep_last <= 0 = keep all)
POS = Bound(lo=0, lo_open=True)  # > 0
ONE = Bound(lo=1)  # >= 1 (counts and sizes)
NONNEG = Bound(lo=0)  # >= 0
UNIT = Bound(lo=0, hi=1)  # probabilities and fractions

CONSTRAINTS: dict[str, Bound] = {
    "seed": NONNEG, "world_size": ONE,
    # model
    "model.vocab_size": ONE, "model.hidden_size": ONE, "model.num_layers": ONE,
    "model.num_attention_heads": ONE, "model.num_query_groups": ONE, "model.kv_channels": ONE,
    "model.ffn_hidden_size": ONE, "model.rotary_base": POS, "model.norm_epsilon": POS,
    "model.max_sequence_length": ONE, "model.init_std": POS,
    "model.vision.image_size": ONE, "model.vision.patch_size": ONE,
    "model.vision.hidden_size": ONE, "model.vision.num_layers": ONE,
    "model.vision.num_attention_heads": ONE, "model.vision.ffn_hidden_size": ONE,
    "model.vision.max_frames": ONE,
    "model.qwen_vl.depth": ONE, "model.qwen_vl.hidden_size": ONE, "model.qwen_vl.num_heads": ONE,
    "model.qwen_vl.intermediate_size": ONE, "model.qwen_vl.patch_size": ONE,
    "model.qwen_vl.temporal_patch_size": ONE, "model.qwen_vl.spatial_merge_size": ONE,
    "model.qwen_vl.num_position_embeddings": ONE, "model.qwen_vl.deepstack_visual_indexes": NONNEG,
    "model.qwen_vl.rope_theta": POS, "model.qwen_vl.mrope_section": NONNEG,
    "model.qwen_vl.image_token_id": NONNEG, "model.qwen_vl.video_token_id": NONNEG,
    "model.qwen_vl.vision_start_token_id": NONNEG, "model.qwen_vl.vision_end_token_id": NONNEG,
    "model.qwen_vl.min_pixels": ONE, "model.qwen_vl.max_pixels": ONE,
    "model.qwen_vl.max_frames": ONE,
    # parallel / precision / branches
    "parallel.tp": ONE, "parallel.pp": ONE, "parallel.cp": ONE, "parallel.dp": ONE,
    "precision.fp8_bf16_edge_layers": NONNEG,
    "branches[].beta": NONNEG,
    # schedule
    "schedule.cycles": NONNEG, "schedule.s_rl": NONNEG, "schedule.s_opd": NONNEG,
    "schedule.steps": ONE, "schedule.overlap_floor": UNIT, "schedule.overlap_ceiling": UNIT,
    # grpo / opd
    "grpo.prompts_per_step": ONE, "grpo.group_size": ONE, "grpo.temperature": POS,
    "grpo.top_p": Bound(lo=0, hi=1, lo_open=True), "grpo.top_k": NONNEG,
    "grpo.max_new_tokens": ONE, "grpo.eps_low": Bound(lo=0, hi=1, hi_open=True),
    "grpo.eps_high": NONNEG, "grpo.kl_coef": NONNEG, "grpo.adv_eps": POS,
    "grpo.reward_workers": NONNEG, "grpo.reward_timeout_s": POS, "grpo.micro_batch_size": ONE,
    "grpo.rollout_batch_size": ONE,
    "opd.prompts_per_step": ONE, "opd.samples_per_prompt": ONE, "opd.topk": ONE,
    "opd.orm_alpha": NONNEG,
    # optim
    "optim.lr": POS, "optim.min_lr": NONNEG, "optim.warmup_steps": NONNEG,
    "optim.weight_decay": NONNEG, "optim.adam_beta1": Bound(lo=0, hi=1, hi_open=True),
    "optim.adam_beta2": Bound(lo=0, hi=1, hi_open=True), "optim.adam_eps": POS,
    "optim.clip_grad": NONNEG,
    # data
    "data.eval_size": ONE, "data.train_size": ONE, "data.max_prompt_tokens": ONE,
    "data.base_seed": NONNEG, "data.base_warmup_steps": NONNEG, "data.base_warmup_batch": ONE,
    "data.base_warmup_lr": POS,
    "data.toy.text_min_steps": ONE, "data.toy.text_max_steps": ONE,
    "data.toy.text_max_operand": ONE, "data.toy.text_word_frac": UNIT, "data.toy.phrasings": ONE,
    "data.toy.warmup_size": NONNEG,
    # checkpoint / logging / eval
    "checkpoint.interval": NONNEG, "checkpoint.keep_last": ANY, "checkpoint.keep_every": NONNEG,
    "checkpoint.grace_seconds": NONNEG,
    "logging.log_interval": ONE,
    "eval.max_items": ONE, "eval.batch_size": ONE,
}


def _is_numeric(tp: Any) -> bool:
    if tp in (int, float):
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return bool(args) and args[0] in (int, float)
    return bool(args) and all(a in (int, float, type(None)) for a in args)


def numeric_fields(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of every numeric field (lists of numbers included) under ``cls``."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp)
        sub = [a for a in (tp, *args) if dataclasses.is_dataclass(a)]
        if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            out += numeric_fields(args[0], f"{prefix}{f.name}[].")
        elif sub:
            out += numeric_fields(sub[0], f"{prefix}{f.name}.")
        elif _is_numeric(tp):
            out.append(prefix + f.name)
    return out


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """ConfigError (one line, the field's name) for the first numeric value outside its domain.
    ``cfg``: a RunConfig, or one of its sections with its dotted ``prefix`` (``"model.qwen_vl."``)."""
    _walk(cfg, prefix, prefix)


def _walk(obj: Any, key: str, table_key: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        k, tk = f"{key}{f.name}", f"{table_key}{f.name}"
        if dataclasses.is_dataclass(value):
            _walk(value, k + ".", tk + ".")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                _walk(item, f"{k}.{i}.", tk + "[].")
        elif tk in CONSTRAINTS and value is not None:
            bound = CONSTRAINTS[tk]
            items = value if isinstance(value, list) else [value]
            for i, v in enumerate(items):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not bound.ok(v):
                    where = f"{k}.{i}" if isinstance(value, list) else k
                    raise ConfigError(f"{where}: expected {bound.describe()}, got {v!r}")
