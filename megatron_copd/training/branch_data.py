"""The prompts a branch draws: its own domains (native GRPO batch) and, as a student, its
teachers' domains (OPD prompts), plus every domain's held-out set for evaluation.

Sampling is identical on every rank of the world (same seed, same records): a branch's prompt
batch for a step is the same list everywhere, and each DP rank takes its contiguous share. The
sampler positions are the only state (saved with checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_copd.config import ConfigError, RunConfig
from megatron_copd.data.records import PromptRecord, load_many
from megatron_copd.data.sampler import MixedSampler, PromptSampler
from megatron_copd.errors import DataError


@dataclass
class DataSources:
    """Train records per branch and held-out records per domain."""

    train: dict[str, list[PromptRecord]]  # branch name -> its prompt set D_k
    eval: dict[str, list[PromptRecord]]  # domain -> held-out items


def toy_sources(cfg: RunConfig, world) -> DataSources:
    """The toy world's files for every branch's domains."""
    train, evals = {}, {}
    for b in cfg.branches:
        for d in b.domains:
            if d not in world.domains:
                raise ConfigError(
                    f"branches: domain {d!r} of branch {b.name!r} is not a toy-world domain "
                    f"{list(world.domains)}"
                )
        train[b.name] = load_many([world.path(d, "train") for d in b.domains])
    for d in sorted({d for b in cfg.branches for d in b.domains}):
        evals[d] = load_many([world.path(d, "eval")])[: cfg.eval.max_items]
    return DataSources(train, evals)


def file_sources(cfg: RunConfig) -> DataSources:
    """JSONL / Parquet files named by each branch's train_data / eval_data. Every row is checked
    (one DataError line naming file, line and field): its domain is one of its branch's (any
    branch's for held-out files), its verifier exists, it has media only if the model has a
    vision tower; and every domain of a branch has training rows."""
    from megatron_copd.rewards import available_verifiers

    checks = dict(known_rewards=available_verifiers(), media=cfg.model.vision_side is not None)
    every_domain = {d for b in cfg.branches for d in b.domains}
    train: dict[str, list[PromptRecord]] = {}
    evals: dict[str, list[PromptRecord]] = {}
    for i, b in enumerate(cfg.branches):
        if not b.train_data:
            raise ConfigError(f"branches.{i}.train_data: data.world is 'files' but no files given")
        for key, paths in (("train_data", b.train_data), ("eval_data", b.eval_data)):
            for p in paths:
                if not Path(p).exists():
                    raise ConfigError(f"branches.{i}.{key}: file not found: {p}")
        train[b.name] = load_many(b.train_data, default_domain=b.domains[0], domains=b.domains,
                                  **checks)
        empty = sorted(set(b.domains) - {r.domain for r in train[b.name]})
        if empty:
            raise DataError(f"branches.{i}.train_data: no rows for domain(s) {empty} of branch "
                            f"{b.name!r} in {b.train_data}")
        held_out = load_many(b.eval_data, default_domain=b.domains[0], domains=every_domain,
                             **checks) if b.eval_data else []
        for rec in held_out:
            evals.setdefault(rec.domain, []).append(rec)
    for d in evals:
        evals[d] = evals[d][: cfg.eval.max_items]
    return DataSources(train, evals)


def check_tokenizer(cfg: RunConfig, tokenizer, tokenizer_dir: str) -> None:
    """The tokenizer fits the model: its vocabulary, and a Qwen-VL's vision tokens and
    processor files."""
    if cfg.model.qwen_vl is not None:
        from megatron_copd.models.qwen_vl import processing

        processing.check_tokenizer(tokenizer, cfg.model.qwen_vl)
        processing.check_processor_dir(tokenizer_dir, cfg.model.qwen_vl)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's vocabulary ({tokenizer.vocab_size})")


def check_files_world(cfg: RunConfig) -> None:
    """What a ``data.world: files`` run reads, checked before any worker starts (light
    imports only, so a refusal stays one line): every data row, then the tokenizer."""
    from megatron_copd.data.tokenizer import Tokenizer

    file_sources(cfg)
    check_tokenizer(cfg, Tokenizer.load(cfg.data.tokenizer), cfg.data.tokenizer)


def _sampler(records: list[PromptRecord], seed: int) -> PromptSampler | MixedSampler:
    domains = sorted({r.domain for r in records})
    if len(domains) == 1:
        return PromptSampler(records, seed)
    # Several domains in one branch (mixed RLVR): the union, in proportion to the data sizes.
    by_domain = {d: [r for r in records if r.domain == d] for d in domains}
    return MixedSampler(
        {d: PromptSampler(rs, seed + i) for i, (d, rs) in enumerate(by_domain.items())},
        mode="proportional",
    )


class BranchData:
    """One branch's samplers: ``native`` over D_k and one per teacher over D_teacher."""

    def __init__(
        self, sources: DataSources, branch: str, teachers: list[str], seed: int, index: int
    ) -> None:
        if branch not in sources.train:
            raise DataError(f"branch {branch!r}: no training data")
        self.branch = branch
        self.native = _sampler(sources.train[branch], seed + 1000 * index)
        # A student draws its teacher's prompts with its own stream (seeded by both names), so
        # two students of one teacher do not see the same prompts in the same order.
        self.peer = {
            t: _sampler(sources.train[t], seed + 1000 * index + 17 + k)
            for k, t in enumerate(sorted(teachers))
        }

    def native_batch(self, n: int) -> list[PromptRecord]:
        return self.native.next_batch(n)

    def peer_batch(self, teacher: str, n: int) -> list[PromptRecord]:
        return self.peer[teacher].next_batch(n)

    def state_dict(self) -> dict:
        return {
            "native": self.native.state_dict(),
            "peer": {t: s.state_dict() for t, s in self.peer.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.native.load_state_dict(state["native"])
        for t, s in state.get("peer", {}).items():
            if t in self.peer:
                self.peer[t].load_state_dict(s)


def dp_share(items: list, dp_rank: int, dp_size: int) -> list:
    """This DP rank's contiguous share of a global batch (sizes are validated to divide)."""
    per = len(items) // dp_size
    return items[dp_rank * per : (dp_rank + 1) * per]
