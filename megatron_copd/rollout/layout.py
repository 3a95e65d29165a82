"""The ``[B, T]`` sequence layout shared by rollout, scoring and training.

A row is ``left padding | prompt | response | right padding``. Prompts are left-padded to a common
width ``P`` so every prompt ends at column ``P - 1`` and every response starts at column ``P``:
decode step ``t`` writes column ``P + t`` for the whole batch, and response-aligned values (token
``t`` of every response) are one column slice of any label-aligned tensor.

Label convention (megatron's): the logits at column ``c`` predict the token at column ``c + 1``,
so ``labels[:, c] = tokens[:, c + 1]`` and ``loss_mask[:, c]`` is True where that next token is a
response token. Response token ``t`` is therefore scored at label column ``P - 1 + t``.

RoPE is relative and megatron applies it by slot index, so left padding shifts every position by
the same amount and leaves every logit unchanged; the padding itself is hidden by the attention
mask (causal AND key-is-not-padding). ``position_ids`` count from each row's first real token
(what learned or multimodal position embeddings would need).

Explicit masks need an attention that applies them: megatron's local attention does; Transformer
Engine's applies its configured mask type (causal) and ignores ``attention_mask``. A full forward
can instead run on :meth:`PackedBatch.aligned_left` (rows shifted left, causal, no mask) and map
its results back with :meth:`PackedBatch.from_aligned` — scoring always does that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch


def attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool (True = real token) -> ``[B, 1, T, T]`` bool, True = masked.

    A query may see a key when the key is not after it and the key is a real token. Rows that are
    all padding see nothing; the local softmax then spreads evenly over masked scores (finite),
    and their outputs are never used.
    """
    t = valid.shape[1]
    future = torch.ones(t, t, dtype=torch.bool, device=valid.device).triu_(1)
    return future.view(1, 1, t, t) | ~valid[:, None, None, :]


def key_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` -> ``[B, 1, 1, T]`` (True = masked): the decode-step mask, where the single new
    query may see every earlier real token."""
    return ~valid[:, None, None, :]


def position_ids(valid: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (0 on the left padding)."""
    return (valid.long().cumsum(dim=1) - 1).clamp_(min=0)


@dataclass
class PackedBatch:
    """Prompts (+ responses) in the shared layout. Build with :func:`pack`."""

    tokens: torch.Tensor  # [B, T] int64
    valid: torch.Tensor  # [B, T] bool, True on prompt and response tokens
    prompt_width: int  # P: prompts end at column P - 1
    prompt_lens: torch.Tensor  # [B] int64
    response_lens: torch.Tensor  # [B] int64

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    @property
    def response_width(self) -> int:
        """R = T - P: room for responses (>= the longest one)."""
        return self.width - self.prompt_width

    @cached_property
    def attention_mask(self) -> torch.Tensor:
        return attention_mask(self.valid)

    @cached_property
    def position_ids(self) -> torch.Tensor:
        return position_ids(self.valid)

    @cached_property
    def response_mask(self) -> torch.Tensor:
        """[B, T] bool: True on response tokens."""
        cols = torch.arange(self.width, device=self.tokens.device)
        start = self.prompt_width
        return (cols >= start) & (cols < start + self.response_lens[:, None])

    @cached_property
    def labels(self) -> torch.Tensor:
        """[B, T]: the next token (the last column repeats a pad; it is never in loss_mask)."""
        return torch.cat([self.tokens[:, 1:], self.tokens[:, -1:]], dim=1)

    @cached_property
    def loss_mask(self) -> torch.Tensor:
        """[B, T] bool: True at label columns whose target is a response token."""
        m = self.response_mask
        return torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], dim=1)

    def response_values(self, label_aligned: torch.Tensor) -> torch.Tensor:
        """Label-aligned ``[B, T, ...]`` -> response-aligned ``[B, R, ...]`` (column t = token t)."""
        p = self.prompt_width
        return label_aligned[:, p - 1 : p - 1 + self.response_width]

    @cached_property
    def left_pad(self) -> torch.Tensor:
        """[B] number of padding columns before each row's prompt."""
        return self.prompt_width - self.prompt_lens

    def aligned_left(self) -> torch.Tensor:
        """Tokens with each row shifted left by its padding: ``[B, T]`` with only right padding.

        A causal LM needs no attention mask for this form (padding comes after every real token),
        which is what attention kernels with a fixed causal mask type (Transformer Engine) can
        do. Map per-column results back with :meth:`from_aligned`.
        """
        return shift_rows(self.tokens, -self.left_pad)

    def from_aligned(self, values: torch.Tensor) -> torch.Tensor:
        """Per-column values ``[B, T, ...]`` computed on :meth:`aligned_left` -> this layout."""
        return shift_rows(values, self.left_pad)

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(
            self.tokens.to(device),
            self.valid.to(device),
            self.prompt_width,
            self.prompt_lens.to(device),
            self.response_lens.to(device),
        )


def shift_rows(values: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Roll each row of ``[B, T, ...]`` right by ``shift[b]`` columns (negative: left)."""
    b, t = values.shape[:2]
    cols = (torch.arange(t, device=values.device)[None, :] - shift.to(values.device)[:, None]) % t
    index = cols.view(b, t, *([1] * (values.dim() - 2))).expand_as(values)
    return values.gather(1, index)


def _as_lists(seqs: Sequence[Sequence[int]] | None, n: int) -> list[list[int]]:
    if seqs is None:
        return [[] for _ in range(n)]
    return [s.tolist() if isinstance(s, torch.Tensor) else list(s) for s in seqs]


def pack(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]] | None = None,
    pad_id: int = 0,
    response_width: int | None = None,
    device: torch.device | str | None = None,
) -> PackedBatch:
    """Lay prompts (and optional responses) out as ``[B, P + R]``.

    ``response_width`` reserves room for generation (default: the longest response). Prompts must
    be non-empty (validate user input first: ``rollout.inputs.check_prompts``).
    """
    n = len(prompts)
    prompts_l = _as_lists(prompts, n)
    responses_l = _as_lists(responses, n)
    if len(responses_l) != n:
        raise ValueError(f"{len(responses_l)} responses for {n} prompts")
    p_lens = [len(p) for p in prompts_l]
    r_lens = [len(r) for r in responses_l]
    if any(x == 0 for x in p_lens):
        raise ValueError("pack: every prompt needs at least one token")
    width_p = max(p_lens, default=1)
    width_r = max(r_lens, default=0) if response_width is None else response_width
    if max(r_lens, default=0) > width_r:
        raise ValueError(f"a response is longer than response_width={width_r}")
    tokens = torch.full((n, width_p + width_r), pad_id, dtype=torch.long)
    valid = torch.zeros((n, width_p + width_r), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts_l, responses_l)):
        start = width_p - len(p)
        tokens[i, start:width_p] = torch.tensor(p, dtype=torch.long)
        if r:
            tokens[i, width_p : width_p + len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, start : width_p + len(r)] = True
    batch = PackedBatch(
        tokens,
        valid,
        width_p,
        torch.tensor(p_lens, dtype=torch.long),
        torch.tensor(r_lens, dtype=torch.long),
    )
    return batch.to(device) if device is not None else batch


def unpad_responses(tokens: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Response-aligned ``[N, R]`` + lengths -> ragged python lists."""
    return [row[: int(n)].tolist() for row, n in zip(tokens.cpu(), lengths.cpu())]


def ragged_values(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Response-aligned ``[N, R, ...]`` -> the valid entries concatenated, ``[sum(lengths), ...]``."""
    r = values.shape[1]
    keep = torch.arange(r, device=values.device)[None, :] < lengths.to(values.device)[:, None]
    return values[keep]


def unragged_values(
    flat: torch.Tensor, lengths: torch.Tensor, width: int, fill: float = 0
) -> torch.Tensor:
    """Inverse of :func:`ragged_values`: ``[sum(lengths), ...]`` -> ``[N, width, ...]``."""
    n = lengths.shape[0]
    out = flat.new_full((n, width, *flat.shape[1:]), fill)
    keep = torch.arange(width, device=flat.device)[None, :] < lengths.to(flat.device)[:, None]
    out[keep] = flat
    return out
