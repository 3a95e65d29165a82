"""Validation of rollout / scoring inputs and the images-to-rows bookkeeping.

Every rank of a branch receives the same inputs and runs these checks before any communication,
so a bad input fails everywhere with the same one-line :class:`DataError` instead of hanging a
pipeline peer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from megatron.core.utils import unwrap_model

from megatron_copd.errors import DataError
from megatron_copd.models.qwen_vl.media import QwenVisualInputs
from megatron_copd.models.qwen_vl.spec import QwenVisionSpec


@dataclass(frozen=True)
class ModelFacts:
    """What input checks need to know about the branch model (identical on every stage)."""

    vocab_size: int
    max_sequence_length: int
    image_token_id: int | None
    tokens_per_image: int | None  # None: text-only model (or native-resolution media)
    qwen_vl: QwenVisionSpec | None = None  # a Qwen-VL model: images / videos of any size

    @classmethod
    def of(cls, model) -> ModelFacts:
        m = unwrap_model(model)
        lm = m.language_model
        spec = getattr(m, "spec", None)
        has_vision = getattr(m, "tokens_per_image", None) is not None
        return cls(
            vocab_size=lm.vocab_size,
            max_sequence_length=lm.max_sequence_length,
            image_token_id=m.image_token_id if has_vision or spec is not None else None,
            tokens_per_image=m.tokens_per_image if has_vision else None,
            qwen_vl=spec,
        )

    @property
    def media_token_ids(self) -> tuple[int, ...]:
        """Placeholder ids that only media may fill (never sampled, never in a response)."""
        if self.qwen_vl is not None:
            return (self.qwen_vl.image_token_id, self.qwen_vl.video_token_id)
        return () if self.image_token_id is None else (self.image_token_id,)


def as_token_lists(seqs: Sequence[Sequence[int]] | torch.Tensor, what: str) -> list[list[int]]:
    if isinstance(seqs, torch.Tensor):
        if seqs.dim() != 2:
            raise DataError(f"{what}: expected a list of token id lists or a [N, L] tensor")
        return seqs.tolist()
    out = []
    for i, s in enumerate(seqs):
        if isinstance(s, torch.Tensor):
            s = s.tolist()
        elif isinstance(s, (str, bytes)) or not isinstance(s, Sequence):
            raise DataError(f"{what} {i}: expected a list of token ids, got {type(s).__name__}")
        out.append(list(s))
    return out


def check_tokens(
    seqs: list[list[int]],
    facts: ModelFacts,
    what: str,
    allow_empty: bool = False,
    allow_image_tokens: bool = True,
) -> None:
    """Non-empty (unless allowed), integer ids in ``[0, vocab)``."""
    for i, s in enumerate(seqs):
        if not s and not allow_empty:
            raise DataError(f"{what} {i}: empty (expected at least one token id)")
        for tok in s:
            if not isinstance(tok, int) or not 0 <= tok < facts.vocab_size:
                raise DataError(
                    f"{what} {i}: token id {tok!r} is not an integer in [0, {facts.vocab_size})"
                )
        if not allow_image_tokens:
            for tok in facts.media_token_ids:
                if tok in s:
                    raise DataError(f"{what} {i}: contains the media placeholder id {tok}, "
                                    "which may only appear in prompts")


def check_context(prompt_lens: list[int], extra: int, facts: ModelFacts, what: str) -> None:
    """Every prompt plus ``extra`` (new tokens) must fit the model's context."""
    limit = facts.max_sequence_length
    for i, n in enumerate(prompt_lens):
        if n + extra > limit:
            raise DataError(
                f"{what} {i}: {n} prompt tokens + {extra} new tokens = {n + extra} exceeds the "
                f"model context (model.max_sequence_length = {limit})"
            )


def check_sequence_lengths(
    prompt_lens: list[int], response_lens: list[int], facts: ModelFacts
) -> None:
    """Every prompt + response must fit the model's context."""
    limit = facts.max_sequence_length
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        if p + r > limit:
            raise DataError(
                f"sequence {i}: {p} prompt + {r} response tokens = {p + r} exceeds the model "
                f"context (model.max_sequence_length = {limit})"
            )


def images_per_sequence(
    seqs: list[list[int]], pixels: torch.Tensor | None, facts: ModelFacts, what: str
) -> list[int]:
    """Count the images each sequence holds (from its placeholders) and check them against
    ``pixels [n_images, 3, H, W]`` (batch-major: all of sequence 0's images, then 1's...).
    A Qwen-VL model takes a :class:`QwenVisualInputs` and gets (images, videos) per sequence."""
    if facts.qwen_vl is not None or isinstance(pixels, QwenVisualInputs):
        return _media_per_sequence(seqs, pixels, facts, what)
    n_given = 0 if pixels is None else int(pixels.shape[0])
    if pixels is not None and pixels.dim() != 4:
        raise DataError(f"pixels: expected [n_images, 3, H, W], got shape {list(pixels.shape)}")
    if facts.tokens_per_image is None:
        if n_given:
            raise DataError(f"pixels: {n_given} image(s) given to a text-only model")
        return [0] * len(seqs)
    tpi = facts.tokens_per_image
    counts = []
    for i, s in enumerate(seqs):
        slots = sum(1 for t in s if t == facts.image_token_id)
        if slots % tpi:
            raise DataError(
                f"{what} {i}: {slots} image placeholder tokens (id {facts.image_token_id}) is "
                f"not a multiple of tokens_per_image = {tpi}"
            )
        counts.append(slots // tpi)
    if sum(counts) != n_given:
        raise DataError(
            f"pixels: {n_given} image(s) given but the {what}s hold placeholders for "
            f"{sum(counts)} images ({tpi} tokens each)"
        )
    return counts


def _media_per_sequence(seqs, media, facts: ModelFacts, what: str) -> list:
    if facts.qwen_vl is None:
        raise DataError("pixels: Qwen-VL media (QwenVisualInputs) given to a model without a "
                        "Qwen-VL vision tower")
    if media is None:
        media = QwenVisualInputs()
    elif not isinstance(media, QwenVisualInputs):
        raise DataError(f"pixels: a Qwen-VL model takes QwenVisualInputs (the HF processor's "
                        f"pixel_values / grids), got {type(media).__name__}")
    try:
        return media.per_sequence(seqs, facts.qwen_vl)
    except ValueError as e:
        raise DataError(f"{what} {e}" if str(e).startswith("sequence") else f"pixels: {e}"
                        ) from None


def concat_media(items: Sequence) -> torch.Tensor | QwenVisualInputs | None:
    """The media of several rows / batches in order (None entries skipped): image tensors
    ``[n, 3, H, W]`` concatenated, or one :class:`QwenVisualInputs`."""
    items = [m for m in items if m is not None]
    if not items:
        return None
    if isinstance(items[0], QwenVisualInputs):
        return QwenVisualInputs.cat(items)
    return torch.cat(items)


def image_offsets(counts: list[int]) -> list[int]:
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += c
    return out


def select_images(
    pixels: torch.Tensor | None, counts: list[int], rows: Sequence[int]
) -> torch.Tensor | None:
    """Images of ``rows`` (indices into the sequences ``counts`` describes), batch-major."""
    if isinstance(pixels, QwenVisualInputs):
        return pixels.select(counts, rows)
    if pixels is None or not any(counts[r] for r in rows):
        return None
    offsets = image_offsets(counts)
    idx = [offsets[r] + j for r in rows for j in range(counts[r])]
    return pixels[torch.tensor(idx, dtype=torch.long, device=pixels.device)]
