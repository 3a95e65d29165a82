"""Check that a model config splits over a TP x PP layout (the same rules ``load_config``
applies), for tools that take --tp/--pp without a run config."""

from __future__ import annotations

from megatron_copd.config import (
    BranchConfig,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    validate,
)


def check_layout(model: ModelConfig, tp: int, pp: int) -> None:
    """ConfigError (one line, naming the key) when ``model`` cannot run at TP=tp, PP=pp."""
    cfg = RunConfig(model=model, parallel=ParallelConfig(tp=tp, pp=pp),
                    branches=[BranchConfig(name="base", domains=["text"])])
    validate(cfg, world_size=tp * pp)
    if model.vocab_size % tp:
        # megatron's vocab-parallel embedding and output layer split the vocabulary evenly
        raise ConfigError(f"--tp: {tp} must divide model.vocab_size ({model.vocab_size})")
