"""The embedded CPU toy world: generated text / image / video reasoning tasks with checkable
answers (see :mod:`megatron_copd.data.toy.world`)."""

from megatron_copd.data.toy.vocab import build_toy_tokenizer
from megatron_copd.data.toy.world import DOMAINS, SPLITS, ToySpec, ToyWorld, build_toy_world

__all__ = ["DOMAINS", "SPLITS", "ToySpec", "ToyWorld", "build_toy_tokenizer", "build_toy_world"]
