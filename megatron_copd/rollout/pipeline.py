"""This rank's place in its branch's pipeline, and the stage-to-stage traffic of decoding.

Training and scoring go through megatron's schedules; autoregressive decoding does not fit them
(one token per step, the next step's input comes from the last stage), so it moves hidden states
with plain send/recv over the branch's pp group and broadcasts the sampled tokens from the last
stage to every stage.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_attr_wrapped_model, get_model_config


class PipelineStage:
    def __init__(self, model, pgs: ProcessGroupCollection) -> None:
        self.model = model
        self.pgs = pgs
        self.pp = pgs.pp
        ranks = dist.get_process_group_ranks(self.pp)
        r = self.pp.rank()
        self.size = len(ranks)
        self.is_first = r == 0
        self.is_last = r == self.size - 1
        self.prev_rank = ranks[r - 1] if not self.is_first else None
        self.next_rank = ranks[r + 1] if not self.is_last else None
        self.last_rank = ranks[-1]
        config = get_model_config(model)
        self.hidden_size = config.hidden_size
        self.dtype = config.pipeline_dtype or config.params_dtype
        self._set_input_tensor = get_attr_wrapped_model(model, "set_input_tensor")

    def forward(self, seq_len: int, batch: int, device: torch.device, **kwargs):
        """Run this stage: receive ``[seq_len, batch, hidden]`` from the previous stage (unless
        first), forward, send to the next stage (unless last). Returns the model output on the
        last stage, None elsewhere."""
        if not self.is_first:
            buf = torch.empty(seq_len, batch, self.hidden_size, dtype=self.dtype, device=device)
            dist.recv(buf, src=self.prev_rank, group=self.pp)
            self._set_input_tensor(buf)
        out = self.model(**kwargs)
        if not self.is_last:
            dist.send(out.contiguous(), dst=self.next_rank, group=self.pp)
            return None
        return out

    def broadcast_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every stage gets the last stage's ``tensor`` (same shape/dtype given on all stages)."""
        if self.size > 1:
            dist.broadcast(tensor, src=self.last_rank, group=self.pp)
        return tensor
