"""Batched autoregressive sampling with a KV cache through the branch's own megatron model.

One call samples ``samples_per_prompt`` responses for every prompt. Prompts are sorted by length
and cut into KV batches of whole prompt groups (``kv_batch_size // samples_per_prompt`` prompts;
with Transformer Engine attention, which ignores padding masks, only equal-length prompts share a
KV batch). Each KV batch is prefilled once per *prompt* (the vision tower and the prompt run
once, then the cache rows are copied to the group's samples) and decoded one token per step for
the whole batch until every sample has hit a stop id or ``max_new_tokens``.

The forward is megatron's (``StaticInferenceContext`` KV cache, ``InferenceMode`` so that only the
last position's logits are materialised and gathered over TP). With PP the hidden states move
stage to stage each step and the last stage broadcasts the chosen tokens back to every stage.
Sampling is seeded by sample id (see ``sampling``): tokens are independent of batching, identical
on every TP rank, and equal at any TP/PP size for the same weights.

Decoding runs under ``torch.inference_mode``; what megatron caches meanwhile is dropped on exit
(see :func:`inference_forward`), and the returned tensors are normal tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.utils import InferenceMode
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import unwrap_model

from megatron_copd.errors import DataError
from megatron_copd.models.precision import inference_precision
from megatron_copd.rollout import inputs, layout
from megatron_copd.rollout.fast_decode import FastDecoder, unsupported_reason
from megatron_copd.rollout.pipeline import PipelineStage
from megatron_copd.rollout.positions import DecodePositions, mrope_spec
from megatron_copd.rollout.sampling import SamplingParams, choose_tokens, uniforms


@dataclass
class Rollout:
    """Sampled responses; sample ``i`` answers prompt ``prompt_index[i]`` (prompt-major order:
    the ``G`` samples of prompt 0, then prompt 1's, ...). Tensors live on the model's device and
    are identical on every rank of the branch's model-parallel group."""

    prompts: list[list[int]]
    prompt_index: torch.Tensor  # [N] int64
    tokens: torch.Tensor  # [N, R] int64, pad_id after each length
    lengths: torch.Tensor  # [N] int64, stop token included
    logprobs: torch.Tensor  # [N, R] float32: log pi(y_t), temperature 1, full vocab; 0 past end
    sampling_logprobs: torch.Tensor  # [N, R] float32: log q(y_t) of the sampling distribution
    finished: torch.Tensor  # [N] bool: ended with a stop id (else hit max_new_tokens)
    pixels: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    """[N, R, k] int64 on the last pipeline stage when ``generate(topk=k)``: the policy's k most
    likely tokens at each response position (-1 past the end), for the top-k overlap metric."""  # the prompts' images, batch-major over prompts
    images_per_prompt: list[int] | None = None

    @property
    def num_samples(self) -> int:
        return self.tokens.shape[0]

    def responses(self) -> list[list[int]]:
        return layout.unpad_responses(self.tokens, self.lengths)

    def sample_prompts(self) -> list[list[int]]:
        return [self.prompts[int(i)] for i in self.prompt_index.tolist()]

    def sample_pixels(self) -> torch.Tensor | None:
        """Images of every sample's prompt, batch-major over samples (for a packed forward)."""
        if self.pixels is None:
            return None
        counts = self.images_per_prompt or [0] * len(self.prompts)
        return inputs.select_images(self.pixels, counts, self.prompt_index.tolist())

    def pack(self, pad_id: int = 0) -> layout.PackedBatch:
        """Prompts + responses in the shared training layout."""
        return layout.pack(
            self.sample_prompts(), self.responses(), pad_id=pad_id, device=self.tokens.device
        )


_SP_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


@contextlib.contextmanager
def _sequence_parallel_off(model):
    """Switch sequence parallelism off in every module (and config) that has it, then restore
    each attribute's own value (megatron's ``set_model_to_sequence_parallel`` sets them all to
    one value and expects a bare GPTModel)."""
    saved = []
    for module in model.modules():
        for obj in (module, getattr(module, "config", None)):
            for attr in _SP_ATTRS:
                if obj is not None and getattr(obj, attr, False) is True:
                    saved.append((obj, attr))
                    setattr(obj, attr, False)
    try:
        yield
    finally:
        for obj, attr in saved:
            setattr(obj, attr, True)


def _drop_cached_inference_tensors() -> None:
    """Forget tensors megatron cached while ``torch.inference_mode`` was on: an inference tensor
    that a later training step saves for backward is an error. Megatron caches rotary tables
    (an lru_cache on ``RotaryEmbedding.forward``) and attention scratch space (the global memory
    buffer); both are rebuilt on demand."""
    RotaryEmbedding.forward.cache_clear()
    buffer = parallel_state._GLOBAL_MEMORY_BUFFER
    if buffer is not None:
        for key in [k for k, t in buffer.buffer.items() if t.is_inference()]:
            del buffer.buffer[key]


@contextlib.contextmanager
def inference_forward(model):
    """Eval mode, ``torch.inference_mode`` (measurably less per-op overhead than no_grad in a
    token-by-token loop), megatron's InferenceMode, no sequence parallelism (a one-token step
    cannot be split over TP) and the rollout precision (BF16 unless precision.fp8_rollout, see
    models.precision); everything is restored on exit. Write results into tensors allocated
    outside (those stay normal tensors that training may use)."""
    inner = unwrap_model(model)
    was_training = inner.training
    inner.eval()
    try:
        with (
            _sequence_parallel_off(inner),
            torch.inference_mode(),
            InferenceMode.active(),
            inference_precision(inner),
        ):
            yield
    finally:
        _drop_cached_inference_tensors()
        inner.train(was_training)


def model_device(model) -> torch.device:
    return next(unwrap_model(model).parameters()).device


class KVDecoder:
    """Prefill and one-token decode steps of one KV batch through the whole pipeline.

    Call inside :func:`inference_forward`. Logits come back full-vocabulary (gathered over TP) on
    the last stage and None on other stages; every stage must make the same calls.
    """

    def __init__(
        self,
        model,
        pgs: ProcessGroupCollection,
        max_batch: int,
        max_len: int,
        all_logits: bool = False,
        fast: bool = True,
    ) -> None:
        self.stage = PipelineStage(model, pgs)
        self.model = model
        self.device = model_device(model)
        self.ctx = StaticInferenceContext(max_batch, max_len)
        # False: the prefill returns logits for every prompt position (tests, prompt scoring).
        self.ctx.config.materialize_only_last_token_logits = not all_logits
        self.max_batch = max_batch
        self.max_len = max_len
        self._prefill_rows = 0
        # Decode steps on the lean path when it computes what megatron's layers compute (see
        # rollout.fast_decode); prefill always runs megatron's forward (and the vision tower).
        self.fast = (
            FastDecoder(model, self.stage, pgs.tp, max_batch, max_len)
            if fast and unsupported_reason(model) is None
            else None
        )
        spec = mrope_spec(model)
        self.mrope = None if spec is None else DecodePositions(spec)

    def reset(self) -> None:
        self.ctx.reset()

    def prefill(
        self, tokens: torch.Tensor, valid: torch.Tensor, pixels: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Prompts ``[B, P]`` (left-padded) -> logits ``[B, V]`` at the last column (``[B, P, V]``
        with ``all_logits``)."""
        b, p = tokens.shape
        if b > self.max_batch or p > self.max_len:
            raise ValueError(
                f"prefill of [{b}, {p}] exceeds the KV cache [{self.max_batch}, {self.max_len}]"
            )
        self.ctx.reset()
        self._prefill_rows = b
        if self.fast is not None:
            self.fast.reset()
        logits = self.stage.forward(
            p,
            b,
            self.device,
            input_ids=tokens,
            position_ids=(layout.position_ids(valid) if self.mrope is None
                          else self.mrope.prefill(tokens, valid, pixels)),
            # No padding: megatron's own causal mask (cheaper, and what fused kernels expect).
            attention_mask=None if bool(valid.all()) else layout.attention_mask(valid),
            pixels=pixels,
            inference_context=self.ctx,
            runtime_gather_output=True,
        )
        self.ctx.increment_sequence_len_offset(p)
        self.ctx.enable_decode_mode()
        if logits is None:
            return None
        return logits[:, -1] if self.ctx.config.materialize_only_last_token_logits else logits

    def expand_rows(self, index: torch.Tensor) -> None:
        """Cache row ``i`` becomes a copy of row ``index[i]`` (one prompt -> its G samples)."""
        if self.fast is not None:
            self.fast.load(self.ctx, self.length, index)
            return
        if self.mrope is not None:
            self.mrope.expand(index)
        n, length = index.shape[0], self.length
        for key, value in self.ctx.key_value_memory_dict.values():
            key[:length, :n] = key[:length, index]
            value[:length, :n] = value[:length, index]

    @property
    def can_drop_rows(self) -> bool:
        return self.fast is not None

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Finished rows leave the batch: only rows ``keep`` (ascending) decode on (fast path)."""
        self._take_prefill(None)
        self.fast.keep_rows(keep)

    def _take_prefill(self, rows: int | None) -> None:
        """Fast path straight after prefill: take megatron's cache rows as they are."""
        if not self.fast.rows:
            n = self._prefill_rows if rows is None else rows
            self.fast.load(self.ctx, self.length, torch.arange(n, device=self.device))

    @property
    def length(self) -> int:
        """Tokens already in the cache."""
        if self.fast is not None and self.fast.rows:
            return self.fast.length
        return self.ctx.sequence_len_offset

    def step(
        self, tokens: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Feed one token per row (on the fast path the positions are the cache index, as in
        megatron's static path: RoPE is relative, so the scores are the same).
        ``key_mask [B, 1, 1, L]`` (True = masked) covers the cache plus this token
        (``L = length + 1``); None when no row has padding. Returns logits ``[B, V]``."""
        b = tokens.shape[0]
        if self.fast is not None:
            self._take_prefill(b)
            return self.fast.step(tokens, key_mask)
        if self.length + 1 > self.max_len:
            raise ValueError(f"decode step beyond the KV cache length {self.max_len}")
        logits = self.stage.forward(
            1,
            b,
            self.device,
            input_ids=tokens.view(b, 1),
            position_ids=(positions.view(b, 1) if self.mrope is None
                          else self.mrope.step(positions)),
            attention_mask=key_mask,
            inference_context=self.ctx,
            runtime_gather_output=True,
        )
        self.ctx.increment_sequence_len_offset(1)
        return None if logits is None else logits[:, -1]


def attention_applies_masks(model) -> bool:
    """Megatron's local attention applies any ``attention_mask``; Transformer Engine's applies
    only its configured mask type (causal; the decode step forces no mask) and ignores the
    explicit one, so left-padded batches would attend to padding."""
    return not any(
        type(m).__name__ == "TEDotProductAttention" for m in unwrap_model(model).modules()
    )


def _kv_batches(prompts: list[list[int]], per_batch: int, equal_lengths: bool) -> list[list[int]]:
    """Prompt indices per KV batch: sorted by length (less padding), or one length per batch
    when the attention cannot apply padding masks. Results do not depend on the grouping."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    if not equal_lengths:
        return [order[i : i + per_batch] for i in range(0, len(order), per_batch)]
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < per_batch and len(prompts[out[-1][0]]) == len(prompts[i]):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _check_layout(pgs: ProcessGroupCollection) -> None:
    if pgs.cp is not None and pgs.cp.size() > 1:
        raise NotImplementedError("rollout: context parallelism (parallel.cp > 1) is not supported")


def generate(
    model,
    pgs: ProcessGroupCollection,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    pixels: torch.Tensor | None = None,
    samples_per_prompt: int = 1,
    kv_batch_size: int = 64,
    pad_id: int = 0,
    topk: int = 0,
    fast_decode: bool = True,
) -> Rollout:
    """Sample ``samples_per_prompt`` responses per prompt (collective over the branch's
    model-parallel group: every TP/PP rank calls it with the same arguments).

    ``pixels [n_images, 3, H, W]``: the prompts' images (a video: its frames), batch-major in
    placeholder order; they go through the vision tower once, at prefill.
    ``kv_batch_size``: sequences decoded together (rounded down to whole prompt groups, at least
    one prompt's samples).
    Sample ``p * samples_per_prompt + g`` uses sample id ``p * samples_per_prompt + g`` in the
    seeded noise; give each DP rank / step its own ``params.seed``.
    ``topk``: also record the policy's top-k token ids per position (free: the full-vocabulary
    logits of every step are on the last stage anyway).
    ``fast_decode``: decode steps on :mod:`~megatron_copd.rollout.fast_decode` where it supports
    the model (same tokens and log-probs as megatron's step; finished rows leave the batch);
    False keeps megatron's static-inference decode step.
    """
    _check_layout(pgs)
    facts = inputs.ModelFacts.of(model)
    prompt_lists = inputs.as_token_lists(prompts, "prompt")
    inputs.check_tokens(prompt_lists, facts, "prompt")
    r = params.max_new_tokens
    inputs.check_context([len(p) for p in prompt_lists], r, facts, "prompt")
    counts = inputs.images_per_sequence(prompt_lists, pixels, facts, "prompt")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt: expected >= 1, got {samples_per_prompt}")
    if not 0 <= pad_id < facts.vocab_size or pad_id in facts.media_token_ids:
        raise DataError(f"pad_id: {pad_id} must be a vocabulary id other than a media token")
    banned = [t for t in facts.media_token_ids if t not in params.banned_ids]
    if banned:
        params = dataclasses.replace(params, banned_ids=(*params.banned_ids, *banned))

    g = samples_per_prompt
    n = len(prompt_lists) * g
    device = model_device(model)
    tokens = torch.full((n, r), pad_id, dtype=torch.long, device=device)
    lengths = torch.full((n,), r, dtype=torch.long, device=device)
    logprobs = torch.zeros(n, r, dtype=torch.float32, device=device)
    sampling_lps = torch.zeros(n, r, dtype=torch.float32, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    topk_ids = torch.full((n, r, topk), -1, dtype=torch.long, device=device) if topk else None

    per_batch = max(1, kv_batch_size // g)
    chunks = _kv_batches(prompt_lists, per_batch, not attention_applies_masks(model))
    if pixels is not None:
        pixels = pixels.to(device)
    with inference_forward(model):
        if chunks:
            max_prompt = max(len(p) for p in prompt_lists)
            decoder = KVDecoder(model, pgs, per_batch * g, max_prompt + r, fast=fast_decode)
        for chunk in chunks:
            rows = torch.tensor([p * g + j for p in chunk for j in range(g)], device=device)
            out = _generate_batch(
                decoder,
                [prompt_lists[p] for p in chunk],
                inputs.select_images(pixels, counts, chunk),
                rows,
                g,
                params,
                pad_id,
                topk,
            )
            tokens[rows], lengths[rows], logprobs[rows], sampling_lps[rows], finished[rows] = out[:5]
            if topk and out[5] is not None:
                topk_ids[rows] = out[5]
    return Rollout(
        prompts=prompt_lists,
        prompt_index=torch.arange(n, device=device) // g,
        tokens=tokens,
        lengths=lengths,
        logprobs=logprobs,
        sampling_logprobs=sampling_lps,
        finished=finished,
        pixels=pixels,
        images_per_prompt=counts,
        topk_ids=topk_ids if topk and pgs.pp.rank() == pgs.pp.size() - 1 else None,
    )


def _generate_batch(
    decoder: KVDecoder,
    prompts: list[list[int]],
    pixels: torch.Tensor | None,
    sample_ids: torch.Tensor,
    g: int,
    params: SamplingParams,
    pad_id: int,
    topk: int = 0,
):
    """One KV batch: prefill the prompts once, copy each to its ``g`` rows, decode."""
    device, stage = decoder.device, decoder.stage
    r = params.max_new_tokens
    batch = layout.pack(prompts, pad_id=pad_id, response_width=r, device=device)
    p = batch.prompt_width
    logits = decoder.prefill(batch.tokens[:, :p], batch.valid[:, :p], pixels)
    b = len(prompts) * g
    valid = batch.valid.repeat_interleave(g, dim=0)
    valid[:, p:] = True  # generated tokens are real tokens for later queries
    key_mask = None if bool(valid.all()) else layout.key_padding_mask(valid)
    first_position = batch.prompt_lens.repeat_interleave(g)
    if g > 1:
        decoder.expand_rows(torch.arange(len(prompts), device=device).repeat_interleave(g))
        if logits is not None:
            logits = logits.repeat_interleave(g, dim=0)

    out_tokens = torch.full((b, r), pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros(b, r, dtype=torch.float32, device=device)
    out_slp = torch.zeros(b, r, dtype=torch.float32, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    out_topk = None
    if topk and stage.is_last:
        out_topk = torch.full((b, r, topk), -1, dtype=torch.long, device=device)
    stop_ids = torch.tensor(params.stop_ids, dtype=torch.long, device=device)
    shared = torch.empty(b, 3, dtype=torch.float64, device=device)
    if stage.is_last and not params.greedy:  # every step's random numbers at once
        u = uniforms(params.seed, sample_ids[:, None], torch.arange(r, device=device)[None, :])
    # ``act``: the rows still in the batch. Finished rows leave it (fast path) once they are an
    # eighth of it; tokens do not depend on the batch (noise is seeded per sample id).
    act = torch.arange(b, device=device)
    rows_mask, rows_position = key_mask, first_position
    for t in range(r):
        m = act.shape[0]
        if stage.is_last:
            y, lp, slp = choose_tokens(
                logits, params, sample_ids[act], t, None if params.greedy else u[act, t]
            )
            if out_topk is not None:
                out_topk[act, t] = logits.topk(topk, dim=-1).indices
        if stage.size > 1:
            # token ids are exact in float64: one broadcast carries all three
            buf = shared[:m]
            if stage.is_last:
                torch.stack([y.double(), lp.double(), slp.double()], dim=1, out=buf)
            stage.broadcast_from_last(buf)
            y, lp, slp = buf[:, 0].long(), buf[:, 1].float(), buf[:, 2].float()
        out_tokens[act, t], out_lp[act, t], out_slp[act, t] = y, lp, slp
        if stop_ids.numel():
            done = torch.isin(y, stop_ids)
            finished[act] |= done
            if bool(finished.all()):
                break
        if t == r - 1:
            break
        if decoder.can_drop_rows and stop_ids.numel():
            n_done = int(finished[act].sum())
            if n_done and 8 * n_done >= m:
                keep = (~finished[act]).nonzero().squeeze(1)
                decoder.keep_rows(keep)
                act, y = act[keep], y[keep]
                rows_mask = None if key_mask is None else key_mask[act]
                rows_position = first_position[act]
        step_mask = None if rows_mask is None else rows_mask[..., : p + t + 1]
        logits = decoder.step(y, rows_position + t, step_mask)
    # A finished row keeps decoding with the batch; everything after its first stop id goes.
    lengths = torch.full((b,), r, dtype=torch.long, device=device)
    if stop_ids.numel():
        is_stop = torch.isin(out_tokens, stop_ids)
        first_stop = torch.where(is_stop.any(dim=1), is_stop.int().argmax(dim=1) + 1, r)
        lengths = torch.minimum(lengths, first_stop)
        past = torch.arange(r, device=device)[None, :] >= lengths[:, None]
        out_tokens.masked_fill_(past, pad_id)
        out_lp.masked_fill_(past, 0.0)
        out_slp.masked_fill_(past, 0.0)
        if out_topk is not None:
            out_topk.masked_fill_(past[..., None], -1)
    return out_tokens, lengths, out_lp, out_slp, finished, out_topk
