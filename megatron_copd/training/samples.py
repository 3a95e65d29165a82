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
    positions: Callable | None = None,
) -> tuple[list[dict], int]:
    """Every sample at one width, cut into equal micro-batches (megatron's pipeline schedule
    needs one shape); the last one is filled with empty rows that carry no loss.

    A row is ``prompt | response | right padding``: its tokens start at column 0, so the
    model's causal attention needs no mask (``attention_mask`` None; Transformer Engine keeps
    its fused kernels, and no ``[T, T]`` mask is built). Response token t of row i is scored at
    label column ``len(prompt_i) - 1 + t``. ``positions(tokens, valid, media)``: the model's
    position ids (default: the token index; a Qwen-VL model's 3-D ids via
    ``rollout.positions.position_ids``)."""
    n = len(samples)
    lengths = [len(p) + len(r) for p, r in zip(samples.prompts, samples.responses)]
    t = math.ceil(max(lengths, default=1) / pad_to) * pad_to
    mb = max(1, min(micro_batch_size, n))
    rows = math.ceil(n / mb) * mb
    tokens = torch.full((rows, t), pad_id, dtype=torch.long)
    valid = torch.zeros(rows, t, dtype=torch.bool)
    loss_mask = torch.zeros(rows, t, dtype=torch.bool)
    old_logp = torch.zeros(rows, t)
    adv = torch.zeros(rows, t)
    for i, (prompt, response) in enumerate(zip(samples.prompts, samples.responses)):
        p, k = len(prompt), len(response)
        tokens[i, : p + k] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        valid[i, : p + k] = True
        loss_mask[i, p - 1 : p - 1 + k] = True
        old_logp[i, p - 1 : p - 1 + k] = samples.old_logp[i]
        adv[i, p - 1 : p - 1 + k] = samples.advantages[i]
    labels = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)
    out = []
    for b in range(rows // mb):
        sl = slice(b * mb, (b + 1) * mb)
        media = inputs.concat_media(samples.pixels[b * mb : min((b + 1) * mb, n)])
        v = valid[sl]
        out.append({
            "tokens": tokens[sl],
            "labels": labels[sl],
            "position_ids": (layout.position_ids(v) if positions is None
                             else positions(tokens[sl], v, media)),
            "attention_mask": None,
            "loss_mask": loss_mask[sl].float(),
            "old_logp": old_logp[sl],
            "advantages": adv[sl],
            "pixels": media,
        })
    return out, t
