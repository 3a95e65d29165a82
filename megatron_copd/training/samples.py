"""Training samples -> fixed-shape micro-batches of right-padded rows (no attention mask).

A sample is a prompt, a response, the response's rollout log-probs (the sampling policy at
temperature 1) and its per-token advantages (GRPO: the sequence's group-normalised reward on
every token; OPD: beta * (log pi_T - log pi_S) per token). Native and distillation samples go
through the same clipped surrogate in the same batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from megatron_copd.rollout import inputs, layout
from megatron_copd.rollout.generation import Rollout


@dataclass
class SampleSet:
    prompts: list[list[int]] = field(default_factory=list)
    responses: list[list[int]] = field(default_factory=list)
    old_logp: list[torch.Tensor] = field(default_factory=list)  # [len_i] each
    advantages: list[torch.Tensor] = field(default_factory=list)  # [len_i] each
    pixels: list[torch.Tensor | None] = field(default_factory=list)  # [n_img, 3, H, W] or None

    def __len__(self) -> int:
        return len(self.prompts)

    def num_tokens(self) -> int:
        return sum(len(p) + len(r) for p, r in zip(self.prompts, self.responses))

    def add_rollout(self, ro: Rollout, advantages: torch.Tensor, keep: torch.Tensor) -> None:
        """Add every kept sample of a rollout; ``advantages`` is response-aligned [N, R]."""
        prompts = ro.sample_prompts()
        responses = ro.responses()
        counts = ro.images_per_prompt or [0] * len(ro.prompts)
        for i in range(ro.num_samples):
            if not bool(keep[i]) or not responses[i]:
                continue
            n = len(responses[i])
            p = int(ro.prompt_index[i])
            self.prompts.append(prompts[i])
            self.responses.append(responses[i])
            self.old_logp.append(ro.logprobs[i, :n].detach().float().cpu())
            self.advantages.append(advantages[i, :n].detach().float().cpu())
            self.pixels.append(inputs.select_images(ro.pixels, counts, [p]))


def build_micro_batches(
    samples: SampleSet, micro_batch_size: int, pad_id: int, pad_to: int = 1,
    positions: Callable | None = None, max_tokens: int = 0,
) -> tuple[list[dict], int]:
    """The samples as training micro-batches -> (micro-batches, the widest one's width).

    A row is ``prompt | response | right padding``: its tokens start at column 0, so the
    model's causal attention needs no mask (``attention_mask`` None; Transformer Engine keeps
    its fused kernels, and no ``[T, T]`` mask is built). Response token t of row i is scored at
    label column ``len(prompt_i) - 1 + t``.

    ``max_tokens`` 0: every sample at one width, cut into micro-batches of ``micro_batch_size``
    rows (the last filled with empty rows that carry no loss). ``max_tokens`` > 0: samples
    sorted by length (longest first) and grouped while ``rows x longest <= max_tokens``, each
    micro-batch at its own width (the pipeline then exchanges shapes: megatron's
    ``variable_seq_lengths``). The loss is a sum of per-sequence means over the global sequence
    count, so the grouping does not change the gradient.
    ``positions(tokens, valid, media)``: the model's position ids (default: the token index; a
    Qwen-VL model's 3-D ids via ``rollout.positions.position_ids``)."""
    n = len(samples)
    lengths = [len(p) + len(r) for p, r in zip(samples.prompts, samples.responses)]
    if max_tokens > 0:
        groups = token_budget_groups(lengths, max_tokens, pad_to)
    else:
        mb = max(1, min(micro_batch_size, n))
        order = list(range(n)) + [-1] * (-n % mb)  # -1: an empty row
        groups = [order[i:i + mb] for i in range(0, len(order), mb)]
    out = [_micro_batch(samples, rows, _width(lengths, rows, pad_to, max_tokens <= 0),
                        pad_id, positions) for rows in groups]
    return out, max((b["tokens"].shape[1] for b in out), default=pad_to)


def token_budget_groups(lengths: list[int], max_tokens: int, pad_to: int = 1
                        ) -> list[list[int]]:
    """Sample indices grouped longest first, ``rows x padded longest <= max_tokens`` each (a
    sample longer than the budget alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups:
            width = math.ceil(lengths[groups[-1][0]] / pad_to) * pad_to
            if (len(groups[-1]) + 1) * width <= max_tokens:
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


def _width(lengths: list[int], rows: list[int], pad_to: int, shared: bool) -> int:
    longest = max(lengths, default=1) if shared else max(lengths[i] for i in rows)
    return math.ceil(max(longest, 1) / pad_to) * pad_to


def _micro_batch(samples: SampleSet, rows: list[int], t: int, pad_id: int,
                 positions: Callable | None) -> dict:
    b = len(rows)
    tokens = torch.full((b, t), pad_id, dtype=torch.long)
    valid = torch.zeros(b, t, dtype=torch.bool)
    loss_mask = torch.zeros(b, t)
    old_logp = torch.zeros(b, t)
    adv = torch.zeros(b, t)
    for j, i in enumerate(rows):
        if i < 0:
            continue
        prompt, response = samples.prompts[i], samples.responses[i]
        p, k = len(prompt), len(response)
        tokens[j, : p + k] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        valid[j, : p + k] = True
        loss_mask[j, p - 1 : p - 1 + k] = 1.0
        old_logp[j, p - 1 : p - 1 + k] = samples.old_logp[i]
        adv[j, p - 1 : p - 1 + k] = samples.advantages[i]
    media = inputs.concat_media([samples.pixels[i] for i in rows if i >= 0])
    return {
        "tokens": tokens,
        "labels": torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1),
        "position_ids": (layout.position_ids(valid) if positions is None
                         else positions(tokens, valid, media)),
        "attention_mask": None,
        "loss_mask": loss_mask,
        "old_logp": old_logp,
        "advantages": adv,
        "pixels": media,
    }
