"""Pure tensor transforms between Hugging Face and megatron parameter layouts.

megatron fuses the attention input projections into one ``linear_qkv`` whose output rows are
grouped per query group (the unit TP splits on): for each of the ``ng`` groups, its
``heads_per_group`` query heads, then its key head, then its value head, each ``head_dim`` rows::

    [ng, (heads_per_group + 2) * head_dim, hidden]   (flattened to 2-D)

Hugging Face keeps ``q_proj`` / ``k_proj`` / ``v_proj`` separate with heads in order, and query
head ``h`` uses key/value head ``h // heads_per_group`` (``repeat_kv``) — the same grouping, so
fusing is a per-group interleave and no head is permuted. Biases (the ViT) have no trailing
``hidden`` dim and follow the same rule.

megatron's gated MLP keeps ``linear_fc1 = [gate; up]`` stacked on the output dim (SwiGLU takes
``silu(first half) * second half``); Hugging Face has ``gate_proj`` and ``up_proj``.
"""

from __future__ import annotations

import torch


def fuse_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int
) -> torch.Tensor:
    """HF q/k/v projections (weights ``[rows, in]`` or biases ``[rows]``) -> megatron qkv."""
    ng = num_query_groups
    trailing = tuple(q.shape[1:])
    parts = [x.reshape(ng, -1, *trailing) for x in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *trailing)


def split_qkv(
    qkv: torch.Tensor, num_query_groups: int, heads_per_group: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron qkv -> HF (q, k, v), each contiguous."""
    ng, d = num_query_groups, head_dim
    trailing = tuple(qkv.shape[1:])
    grouped = qkv.reshape(ng, (heads_per_group + 2) * d, *trailing)
    q, k, v = torch.split(grouped, [heads_per_group * d, d, d], dim=1)
    return tuple(x.reshape(-1, *trailing).contiguous() for x in (q, k, v))  # type: ignore


def qkv_rows(num_query_groups: int, heads_per_group: int, head_dim: int) -> tuple[int, int, int]:
    """Output rows of (q, k, v) for the given attention shape."""
    return (
        num_query_groups * heads_per_group * head_dim,
        num_query_groups * head_dim,
        num_query_groups * head_dim,
    )


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()
