"""Per-token log-probs, entropy and top-k of given sequences under a model, through the pipeline.

The forward is megatron's forward-only schedule (``get_forward_backward_func`` with this branch's
pp group and ``pg_collection``), micro-batched; on the last stage the vocab-parallel logits are
reduced with ``vocab_parallel`` (no full-vocabulary gather). This is the same forward and the
same log-prob function the training step uses, so scores equal the training engine's numbers.

Results are label-aligned (column ``c`` scores ``tokens[c + 1]``, see ``layout``) over a window of
columns, and exist on the last pipeline stage only (None on the others). The forward runs on the
rows shifted left (``PackedBatch.aligned_left``) with megatron's causal mask and no explicit
attention mask, so it is correct with any attention implementation (Transformer Engine ignores
explicit masks) and needs no ``[B, 1, T, T]`` mask.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_model_config, unwrap_model

from megatron_copd.models.precision import inference_precision, inference_width_multiple
from megatron_copd.rollout import inputs, layout
from megatron_copd.rollout.positions import position_ids
from megatron_copd.rollout import vocab_parallel as vp
from megatron_copd.rollout.generation import model_device


@dataclass(frozen=True)
class ScoreSpec:
    """What to compute per position besides the log-prob of the actual next token."""

    topk: int = 10
    """Global top-k token ids per position (0: none)."""
    entropy: bool = True
    topk_logprobs: bool = False
    """Also the log-probs of the top-k ids."""


DEFAULT_SPEC = ScoreSpec()


@dataclass
class TokenScores:
    logprobs: torch.Tensor  # [B, W] float32
    entropy: torch.Tensor | None = None  # [B, W] float32
    topk_ids: torch.Tensor | None = None  # [B, W, k] int64, most likely first
    topk_logprobs: torch.Tensor | None = None  # [B, W, k] float32

    def map(self, fn) -> TokenScores:
        return TokenScores(
            *(
                None if t is None else fn(t)
                for t in (self.logprobs, self.entropy, self.topk_ids, self.topk_logprobs)
            )
        )


def token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    spec: ScoreSpec,
    tp_group=None,
) -> dict[str, torch.Tensor]:
    """Vocab-parallel ``logits [..., V/tp]`` -> the requested per-position statistics."""
    lse = vp.logsumexp(logits, tp_group)
    out = {"logprobs": vp.target_logits(logits, targets, tp_group) - lse}
    if spec.entropy:
        out["entropy"] = vp.entropy(logits, tp_group)
    if spec.topk:
        ids, lps = vp.topk(logits, spec.topk, tp_group, lse=lse)
        out["topk_ids"] = ids
        if spec.topk_logprobs:
            out["topk_logprobs"] = lps
    return out


@contextlib.contextmanager
def _eval_no_grad(model):
    """Eval mode, no autograd, the rollout precision (BF16 unless precision.fp8_rollout)."""
    inner = unwrap_model(model)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad(), inference_precision(inner):
            yield
    finally:
        inner.train(was_training)


def _forward_step(data_iterator, model, *, spec: ScoreSpec, tp_group):
    mb = next(data_iterator)
    output = model(mb["tokens"], mb["position_ids"], None, pixels=mb["pixels"])

    def reduce(output_tensor, non_loss_data=False):
        # output: [b, T, V/tp] on the last stage; pick each row's window columns
        cols = mb["cols"]
        logits = output_tensor.gather(1, cols[..., None].expand(-1, -1, output_tensor.shape[-1]))
        return token_stats(logits, mb["labels"].gather(1, cols), spec, tp_group)

    return output, reduce


def score_packed(
    model,
    pgs: ProcessGroupCollection,
    batch: layout.PackedBatch,
    pixels: torch.Tensor | None = None,
    images_per_row: Sequence[int] | None = None,
    *,
    spec: ScoreSpec = DEFAULT_SPEC,
    micro_batch_size: int = 16,
    start: int = 0,
) -> TokenScores | None:
    """Score label columns ``[start, T - 1)`` of a packed batch (collective over the branch's
    model-parallel group). ``pixels``: images of the rows, batch-major; ``images_per_row`` says
    how many belong to each row. Returns ``[B, T - 1 - start]`` results on the last stage."""
    if pgs.cp is not None and pgs.cp.size() > 1:
        raise NotImplementedError("scoring: context parallelism (parallel.cp > 1) is not supported")
    device = model_device(model)
    batch = batch.to(device)
    config = get_model_config(model)
    n, t = batch.tokens.shape
    end = t - 1
    if not 0 <= start < end:
        raise ValueError(f"score window start {start} outside [0, {end})")
    tp_group = pgs.tp
    # Fixed pipeline shapes: every micro-batch has mb rows and the same width.
    mb = max(1, min(micro_batch_size, n))
    num_mb = math.ceil(n / mb)
    # Sequence parallelism splits the width over TP; FP8 scoring needs aligned GEMM rows.
    multiple = inference_width_multiple(model, tp_group.size())
    width = math.ceil(t / multiple) * multiple
    # Rows shifted left (only right padding): causal attention needs no mask, whatever the
    # attention implementation; RoPE is relative, so the logits are those of the packed layout.
    tokens = torch.zeros(num_mb * mb, width, dtype=torch.long, device=device)
    tokens[:n, :t] = batch.aligned_left()
    labels = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)
    # Window columns [start, T - 1) of the packed layout, per row in the shifted layout.
    cols = torch.zeros(num_mb * mb, end - start, dtype=torch.long, device=device)
    cols[:n] = (torch.arange(start, end, device=device)[None, :] - batch.left_pad[:, None]).clamp(
        min=0
    )
    lengths = torch.zeros(num_mb * mb, dtype=torch.long, device=device)
    lengths[:n] = batch.valid.sum(dim=1)
    valid = torch.arange(width, device=device)[None, :] < lengths[:, None]
    counts = list(images_per_row) if images_per_row is not None else [0] * n
    if pixels is not None:
        pixels = pixels.to(device)
    micro_batches = []
    for i in range(num_mb):
        rows = slice(i * mb, (i + 1) * mb)
        real_rows = range(i * mb, min((i + 1) * mb, n))
        media = inputs.select_images(pixels, counts, real_rows)
        micro_batches.append(
            {
                "tokens": tokens[rows],
                "labels": labels[rows],
                "cols": cols[rows],
                # RoPE counts from column 0 here; a Qwen-VL model's 3-D ids follow the media.
                "position_ids": position_ids(model, tokens[rows], valid[rows], media),
                "pixels": media,
            }
        )
    forward_backward = get_forward_backward_func(pp_size=pgs.pp.size(), vp_size=None)
    with _eval_no_grad(model):
        store = forward_backward(
            forward_step_func=partial(_forward_step, spec=spec, tp_group=tp_group),
            data_iterator=iter(micro_batches),
            model=[model],
            num_microbatches=num_mb,
            seq_length=width,
            micro_batch_size=mb,
            forward_only=True,
            collect_non_loss_data=True,
            p2p_communicator=P2PCommunicator(pp_group=pgs.pp, config=config),
            pg_collection=pgs,
        )
    if pgs.pp.rank() != pgs.pp.size() - 1:
        return None
    merged = {k: torch.cat([d[k] for d in store], dim=0)[:n] for k in store[0]}
    return TokenScores(
        logprobs=merged["logprobs"],
        entropy=merged.get("entropy"),
        topk_ids=merged.get("topk_ids"),
        topk_logprobs=merged.get("topk_logprobs"),
    )


def score_responses(
    model,
    pgs: ProcessGroupCollection,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pixels: torch.Tensor | None = None,
    spec: ScoreSpec = DEFAULT_SPEC,
    micro_batch_size: int = 16,
    pad_id: int = 0,
) -> TokenScores | None:
    """Scores of every response token given its prompt: response-aligned ``[N, R]`` (column t =
    response token t, R = longest response; entries past a response's end are meaningless).

    ``pixels``: the prompts' images, batch-major over the N rows. Validates the input first.
    """
    facts = inputs.ModelFacts.of(model)
    prompt_lists = inputs.as_token_lists(prompts, "prompt")
    response_lists = inputs.as_token_lists(responses, "response")
    if len(prompt_lists) != len(response_lists):
        raise inputs.DataError(
            f"responses: {len(response_lists)} given for {len(prompt_lists)} prompts"
        )
    inputs.check_tokens(prompt_lists, facts, "prompt")
    inputs.check_tokens(response_lists, facts, "response", allow_image_tokens=False)
    inputs.check_sequence_lengths(
        [len(p) for p in prompt_lists], [len(r) for r in response_lists], facts
    )
    counts = inputs.images_per_sequence(prompt_lists, pixels, facts, "prompt")
    if not any(response_lists):
        raise inputs.DataError("responses: all empty, nothing to score")
    batch = layout.pack(prompt_lists, response_lists, pad_id=pad_id)
    scores = score_packed(
        model,
        pgs,
        batch,
        pixels,
        counts,
        spec=spec,
        micro_batch_size=micro_batch_size,
        start=batch.prompt_width - 1,
    )
    return scores
