"""Rollout and scoring on the branch's own model-parallel forward pass.

* ``layout``: the ``[B, T]`` sequence layout shared with training (``pack``, masks, labels).
* ``sampling``: ``SamplingParams`` and the seeded token choice (pure functions).
* ``generation``: KV-cached batched sampling through TP/PP -> ``Rollout``.
* ``vocab_parallel``: log-probs / entropy / top-k from vocab-parallel logits (differentiable).
* ``scoring``: per-token scores of given sequences through megatron's forward-only schedule.
* ``exchange``: cross-branch teacher scoring of every distillation edge (``score_edges``).
"""

from megatron_copd.rollout.exchange import Edge, TeacherScores, score_edges
from megatron_copd.rollout.generation import Rollout, generate
from megatron_copd.rollout.layout import PackedBatch, pack
from megatron_copd.rollout.sampling import SamplingParams, derive_seed
from megatron_copd.rollout.scoring import ScoreSpec, TokenScores, score_packed, score_responses

__all__ = [
    "Edge",
    "PackedBatch",
    "Rollout",
    "SamplingParams",
    "ScoreSpec",
    "TeacherScores",
    "TokenScores",
    "derive_seed",
    "generate",
    "pack",
    "score_edges",
    "score_packed",
    "score_responses",
]
