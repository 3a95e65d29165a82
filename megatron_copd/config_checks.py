"""The domain of every run-config field, in one table, checked before anything starts.

``CONSTRAINTS`` maps each field's dotted name (``branches[].beta`` for list items) to a rule:
a :class:`Bound` for numbers, :class:`Text` / :class:`Each` / :class:`Keys` for strings, lists
of strings and mappings (patterns, names a field must be one of, branch references), and
``TYPED`` where the annotation itself is the whole domain (booleans and ``Literal`` enums, which
``config_base`` enforces while reading). :func:`check_fields` walks a RunConfig and raises one
ConfigError naming the first value outside its field's domain (``optim.lr: expected > 0, got
-1.0``). Rules across fields (divisibility, settings the recipe does not use, ...) stay in
``config.validate``, which calls this first. ``tests/test_config_checks.py`` fails when a field
has no entry here, and ``tests/test_config_fuzz.py`` generates values outside every entry.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable, Collection
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

    def check(self, value: Any, key: str, cfg: Any) -> None:
        items = value if isinstance(value, list) else [value]
        for i, v in enumerate(items):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not self.ok(v):
                where = f"{key}.{i}" if isinstance(value, list) else key
                raise ConfigError(f"{where}: expected {self.describe()}, got {v!r}")


class Typed:
    """The field's annotation is its whole domain (a bool, a ``Literal`` enum): config_base
    refuses anything else while reading, naming the field."""

    def check(self, value: Any, key: str, cfg: Any) -> None:
        return None


Choices = Callable[[Any], "Collection[str] | None"]
"""cfg (None when a section is checked alone) -> the names a value must be one of (None: any)."""


@dataclass(frozen=True)
class Text:
    """A non-empty string, matching ``pattern`` (whole string) and one of ``choices`` if given."""

    what: str = "a non-empty string"
    pattern: str | None = None
    choices: Choices | None = None

    def check(self, value: Any, key: str, cfg: Any) -> None:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{key}: expected {self.what}, got {value!r}")
        if self.pattern and not re.fullmatch(self.pattern, value):
            raise ConfigError(f"{key}: expected {self.what}, got {value!r}")
        allowed = self.choices(cfg) if self.choices else None
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{key}: unknown {self.what} {value!r}; expected one of "
                              f"{list(allowed)}")


@dataclass(frozen=True)
class Each:
    """A list whose every item satisfies ``item``; ``nonempty`` / ``unique`` as named."""

    item: Text
    nonempty: bool = False
    unique: bool = False

    def check(self, value: Any, key: str, cfg: Any) -> None:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {self.item.what}s, got {value!r}")
        if self.nonempty and not value:
            raise ConfigError(f"{key}: expected at least one {self.item.what}, got []")
        for i, v in enumerate(value):
            self.item.check(v, f"{key}.{i}", cfg)
        if self.unique and len(set(value)) != len(value):
            raise ConfigError(f"{key}: expected no repeated entries, got {value}")


@dataclass(frozen=True)
class Keys:
    """A mapping whose keys are among ``choices`` (values are passed through)."""

    what: str
    choices: Choices

    def check(self, value: Any, key: str, cfg: Any) -> None:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if not value:
            return
        allowed = self.choices(cfg)
        for k in value:
            if allowed is not None and k not in allowed:
                raise ConfigError(f"{key}.{k}: not {self.what}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# The names some fields must be one of, looked up when a config is checked (lazy imports: the
# config module stays light; these are the same lists the runtime uses).

def _branch_names(cfg: Any) -> Collection[str] | None:
    return None if cfg is None else [b.name for b in cfg.branches]


def _toy_domains(cfg: Any) -> Collection[str] | None:
    if cfg is None or cfg.data.world != "toy":
        return None  # the files world's records name their own domains
    from megatron_copd.data.toy.world import DOMAINS

    return DOMAINS


def _verifiers(cfg: Any) -> Collection[str]:
    from megatron_copd.rewards import available_verifiers

    return available_verifiers()


def _image_tasks(cfg: Any) -> Collection[str]:
    from megatron_copd.data.toy.image_tasks import TASKS

    return TASKS


def _video_tasks(cfg: Any) -> Collection[str]:
    from megatron_copd.data.toy.video_tasks import TASKS

    return TASKS


def _transformer_config_fields(cfg: Any) -> Collection[str]:
    from megatron.core.transformer import TransformerConfig

    return {f.name for f in dataclasses.fields(TransformerConfig)}


ANY = Bound()  # any finite value (e.g. a seed offset, keep_last <= 0 = keep all)
POS = Bound(lo=0, lo_open=True)  # > 0
ONE = Bound(lo=1)  # >= 1 (counts and sizes)
NONNEG = Bound(lo=0)  # >= 0
UNIT = Bound(lo=0, hi=1)  # probabilities and fractions
TYPED = Typed()
NAME = Text("a name (letters, digits, '-' or '_')", r"[A-Za-z0-9_-]+")
PATH = Text("a path")
BRANCH = Text("branch", choices=_branch_names)
TOY_PHRASINGS = 6  # len(data.toy.world.PHRASINGS); tests/test_toy_world.py checks they agree

CONSTRAINTS: dict[str, Any] = {
    "run_dir": PATH, "seed": NONNEG, "world_size": ONE,
    # model
    "model.family": TYPED, "model.vocab_size": ONE, "model.hidden_size": ONE,
    "model.num_layers": ONE, "model.num_attention_heads": ONE, "model.num_query_groups": ONE,
    "model.kv_channels": ONE, "model.ffn_hidden_size": ONE, "model.rotary_base": POS,
    "model.norm_epsilon": POS, "model.max_sequence_length": ONE, "model.init_std": POS,
    "model.qk_layernorm": TYPED, "model.tie_embeddings": TYPED,
    "model.extra": Keys("a megatron TransformerConfig field", _transformer_config_fields),
    "model.vision.image_size": ONE, "model.vision.patch_size": ONE,
    "model.vision.hidden_size": ONE, "model.vision.num_layers": ONE,
    "model.vision.num_attention_heads": ONE, "model.vision.ffn_hidden_size": ONE,
    "model.vision.class_token": TYPED, "model.vision.max_frames": ONE,
    "model.qwen_vl.depth": ONE, "model.qwen_vl.hidden_size": ONE, "model.qwen_vl.num_heads": ONE,
    "model.qwen_vl.intermediate_size": ONE, "model.qwen_vl.patch_size": ONE,
    "model.qwen_vl.temporal_patch_size": ONE, "model.qwen_vl.spatial_merge_size": ONE,
    "model.qwen_vl.num_position_embeddings": ONE, "model.qwen_vl.deepstack_visual_indexes": NONNEG,
    "model.qwen_vl.rope_theta": POS, "model.qwen_vl.mrope_section": NONNEG,
    "model.qwen_vl.mrope_interleaved": TYPED,
    "model.qwen_vl.image_token_id": NONNEG, "model.qwen_vl.video_token_id": NONNEG,
    "model.qwen_vl.vision_start_token_id": NONNEG, "model.qwen_vl.vision_end_token_id": NONNEG,
    "model.qwen_vl.min_pixels": ONE, "model.qwen_vl.max_pixels": ONE,
    "model.qwen_vl.max_frames": ONE, "model.qwen_vl.version": TYPED,
    "model.qwen_vl.video_fps": POS, "model.qwen_vl.video_min_pixels": ONE,
    "model.qwen_vl.video_max_pixels": ONE,
    "model.qwen_vl.window_size": ONE, "model.qwen_vl.fullatt_block_indexes": NONNEG,
    "model.qwen_vl.tokens_per_second": POS,
    # parallel / precision / branches
    "parallel.tp": ONE, "parallel.pp": ONE, "parallel.cp": ONE, "parallel.dp": ONE,
    "parallel.sequence_parallel": TYPED, "parallel.distributed_optimizer": TYPED,
    "parallel.recompute": TYPED,
    "precision.dtype": TYPED, "precision.fp8": TYPED, "precision.fp8_format": TYPED,
    "precision.fp8_bf16_edge_layers": NONNEG, "precision.fp8_rollout": TYPED,
    "precision.transformer_impl": TYPED,
    "branches[].name": NAME,
    "branches[].domains": Each(Text("domain", r"[A-Za-z0-9_-]+", _toy_domains), unique=True),
    "branches[].train_data": Each(PATH), "branches[].eval_data": Each(PATH),
    "branches[].beta": NONNEG,
    # schedule
    "schedule.recipe": TYPED, "schedule.topology": TYPED, "schedule.hub": BRANCH,
    "schedule.edges[].student": BRANCH, "schedule.edges[].teacher": BRANCH,
    "schedule.drop_edges[].student": BRANCH, "schedule.drop_edges[].teacher": BRANCH,
    "schedule.cycles": NONNEG, "schedule.s_rl": NONNEG, "schedule.s_opd": NONNEG,
    "schedule.steps": ONE, "schedule.adaptive": TYPED, "schedule.overlap_floor": UNIT,
    "schedule.overlap_ceiling": UNIT, "schedule.merge_method": TYPED,
    "schedule.probe_overlap_phase1": TYPED,
    # grpo / opd
    "grpo.prompts_per_step": ONE, "grpo.group_size": ONE, "grpo.temperature": POS,
    "grpo.top_p": Bound(lo=0, hi=1, lo_open=True), "grpo.top_k": NONNEG,
    "grpo.max_new_tokens": ONE, "grpo.eps_low": Bound(lo=0, hi=1, hi_open=True),
    "grpo.eps_high": NONNEG, "grpo.kl_coef": NONNEG, "grpo.adv_eps": POS,
    "grpo.reward_workers": NONNEG, "grpo.reward_timeout_s": POS, "grpo.micro_batch_size": ONE,
    "grpo.max_tokens_per_micro_batch": NONNEG,
    "grpo.rollout_batch_size": ONE, "grpo.filter_zero_variance": TYPED,
    "grpo.default_verifier": Text("verifier", choices=_verifiers),
    "opd.prompts_per_step": ONE, "opd.samples_per_prompt": ONE, "opd.topk": ONE,
    "opd.orm_alpha": NONNEG, "opd.share_clip": TYPED,
    # optim
    "optim.lr": POS, "optim.min_lr": NONNEG, "optim.warmup_steps": NONNEG,
    "optim.weight_decay": NONNEG, "optim.adam_beta1": Bound(lo=0, hi=1, hi_open=True),
    "optim.adam_beta2": Bound(lo=0, hi=1, hi_open=True), "optim.adam_eps": POS,
    "optim.clip_grad": NONNEG, "optim.lr_schedule": TYPED,
    # data
    "data.world": TYPED, "data.tokenizer": PATH, "data.cache_dir": PATH,
    "data.eval_size": ONE, "data.train_size": ONE, "data.max_prompt_tokens": ONE,
    "data.base_seed": NONNEG, "data.base_warmup_steps": NONNEG, "data.base_warmup_batch": ONE,
    "data.base_warmup_lr": POS,
    "data.toy.text_min_steps": ONE, "data.toy.text_max_steps": ONE,
    "data.toy.text_max_operand": Bound(lo=2, hi=99), "data.toy.text_word_frac": UNIT,
    "data.toy.phrasings": Bound(lo=1, hi=TOY_PHRASINGS), "data.toy.warmup_size": NONNEG,
    "data.toy.image_tasks": Each(Text("toy image task", choices=_image_tasks), nonempty=True),
    "data.toy.video_tasks": Each(Text("toy video task", choices=_video_tasks), nonempty=True),
    # checkpoint / logging / eval
    "checkpoint.load": PATH, "checkpoint.interval": NONNEG, "checkpoint.keep_last": ANY,
    "checkpoint.keep_every": NONNEG, "checkpoint.grace_seconds": NONNEG,
    "checkpoint.async_save": TYPED,
    "logging.log_interval": ONE, "logging.tensorboard": TYPED, "logging.progress": TYPED,
    "eval.max_items": ONE, "eval.batch_size": ONE, "eval.at_end": TYPED,
}


def config_fields(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of every leaf field under ``cls`` (list items as ``name[].field``)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp)
        sub = [a for a in (tp, *args) if dataclasses.is_dataclass(a)]
        if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            out += config_fields(args[0], f"{prefix}{f.name}[].")
        elif sub:
            out += config_fields(sub[0], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def check_fields(cfg: Any, prefix: str = "", root: Any = None) -> None:
    """ConfigError (one line, the field's name) for the first value outside its field's domain.
    ``cfg``: a RunConfig, or one of its sections with its dotted ``prefix`` (``"model.qwen_vl."``;
    rules that look at other sections then see ``root``, None when not given)."""
    _walk(cfg, prefix, prefix, cfg if root is None and not prefix else root)


def check_field(cfg: Any, name: str, value: Any, key: str) -> None:
    """Check one value against the rule of field ``name`` (table key), reported as ``key``."""
    CONSTRAINTS[name].check(value, key, cfg)


def _walk(obj: Any, key: str, table_key: str, root: Any) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        k, tk = f"{key}{f.name}", f"{table_key}{f.name}"
        if dataclasses.is_dataclass(value):
            _walk(value, k + ".", tk + ".", root)
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                _walk(item, f"{k}.{i}.", tk + "[].", root)
        elif value is not None and tk in CONSTRAINTS:
            CONSTRAINTS[tk].check(value, k, root)
