"""The toy world's SentencePiece tokenizer, trained on its train split and cached beside it.

BPE with byte fallback (any text encodes; needs vocab >= ~300), digits split one per token (the
arithmetic stays learnable for a tiny model), identity normalisation and no whitespace collapsing
(decode(encode(text)) == text), ``<image>`` as a user-defined symbol (always one id), and
unk/bos/eos/pad = 0/1/2/3.
"""

from __future__ import annotations

import io
from pathlib import Path

from megatron_copd.data.cache import build_once
from megatron_copd.data.tokenizer import COPD_FILE, DEFAULT_IMAGE_TOKEN, SP_MODEL_FILE, Tokenizer
from megatron_copd.data.toy.world import ToyWorld
from megatron_copd.errors import DataError

DEFAULT_VOCAB_SIZE = 512


def train_sentencepiece(texts: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> bytes:
    """Serialized SentencePiece model trained on ``texts`` (deterministic: one thread)."""
    import sentencepiece as spm

    if vocab_size < 300:
        raise DataError(
            f"tokenizer vocab_size: {vocab_size} is too small; byte fallback needs "
            f">= 300 (256 byte pieces + specials + merges)"
        )
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may support fewer merges; never fail on that
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=[DEFAULT_IMAGE_TOKEN],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def corpus(world: ToyWorld) -> list[str]:
    """Prompts and answers of every domain's train (and warm-up) split; eval text never shapes
    the vocab."""
    return [
        row[k]
        for d in world.domains
        for split in world.splits
        if split != "eval"
        for row in world.iter_rows(d, split)
        for k in ("prompt", "answer")
    ]


def build_toy_tokenizer(world: ToyWorld, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train (once) and load the toy tokenizer; cached in ``<world>/tokenizer[-<vocab>]/``."""
    name = "tokenizer" if vocab_size == DEFAULT_VOCAB_SIZE else f"tokenizer-{vocab_size}"
    final = world.root / name

    def build(tmp: Path) -> None:
        (tmp / SP_MODEL_FILE).write_bytes(train_sentencepiece(corpus(world), vocab_size))
        Tokenizer.from_sentencepiece(tmp / SP_MODEL_FILE).save(tmp)  # writes COPD_FILE last

    build_once(final, build, COPD_FILE)
    return Tokenizer.load(final)
