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
# Qwen-VL's vision tokens in the toy vocabulary, in id order 5, 6, 7, 8 (after <image> = 4):
# vision_start, vision_end, image pad, video pad (model.qwen_vl's *_token_id fields).
QWEN_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def train_sentencepiece(texts: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                        extra_symbols: tuple[str, ...] = ()) -> bytes:
    """Serialized SentencePiece model trained on ``texts`` (deterministic: one thread).
    ``extra_symbols``: further single-id tokens after ``<image>`` (ids 5, 6, ...)."""
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
        user_defined_symbols=[DEFAULT_IMAGE_TOKEN, *extra_symbols],
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


def tokenizer_dir_name(vocab_size: int = DEFAULT_VOCAB_SIZE, qwen_vl: bool = False) -> str:
    name = "tokenizer" + ("-qwenvl" if qwen_vl else "")
    return name if vocab_size == DEFAULT_VOCAB_SIZE else f"{name}-{vocab_size}"


def build_toy_tokenizer(world: ToyWorld, vocab_size: int = DEFAULT_VOCAB_SIZE,
                        qwen_vl: bool = False) -> Tokenizer:
    """Train (once) and load the toy tokenizer; cached in ``<world>/tokenizer[-<vocab>]/``.
    ``qwen_vl``: also Qwen-VL's vision tokens (``QWEN_VL_TOKENS``, ids 5-8), for a toy world seen
    through a Qwen3-VL-shaped model; cached apart (``tokenizer-qwenvl...``)."""
    final = world.root / tokenizer_dir_name(vocab_size, qwen_vl)
    extra = QWEN_VL_TOKENS if qwen_vl else ()

    def build(tmp: Path) -> None:
        (tmp / SP_MODEL_FILE).write_bytes(train_sentencepiece(corpus(world), vocab_size, extra))
        Tokenizer.from_sentencepiece(tmp / SP_MODEL_FILE).save(tmp)  # writes COPD_FILE last

    build_once(final, build, COPD_FILE)
    return Tokenizer.load(final)
