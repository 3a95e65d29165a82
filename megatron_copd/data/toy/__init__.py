"""The embedded CPU toy world: generated text / image / video reasoning tasks with checkable
answers (see :mod:`megatron_copd.data.toy.world`)."""

from megatron_copd.data.toy.world import DOMAINS, SPLITS, ToySpec, ToyWorld, build_toy_world

__all__ = ["DOMAINS", "SPLITS", "ToySpec", "ToyWorld", "build_toy_world"]
