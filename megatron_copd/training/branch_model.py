"""A branch's trainable model: megatron DDP + optimizer + LR schedule + pipeline schedule, all
wired to the branch's own process groups.

Everything megatron would otherwise take from its global ``parallel_state`` is passed explicitly
(pg_collection, P2PCommunicator, intra_dist_opt = the branch group), so nothing here ever
communicates with another branch's ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from megatron_copd.config import RunConfig
from megatron_copd.models.factory import build_model, resolve_dtype
from megatron_copd.models.vlm import CopdModel
from megatron_copd.runtime.branches import BranchGroups

# A loss callback: (output of the last stage, micro-batch) -> (loss_sum, normaliser, metrics).
# loss_sum is summed over the micro-batch; the optimizer step divides the gradients by the sum of
# the normalisers over all micro-batches and DP ranks (megatron's per-token-loss mode), so the
# result is independent of how the global batch is split.
LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor, dict]]


@dataclass
class StepResult:
    metrics: dict[str, float]
    grad_norm: float | None
    skipped: bool


class BranchModel:
    """This rank's stage of one branch, ready for forward/backward and optimizer steps."""

    def __init__(
        self,
        cfg: RunConfig,
        groups: BranchGroups,
        image_token_id: int | None,
        total_steps: int = 1000,
    ) -> None:
        self.cfg = cfg
        self.groups = groups
        pgs = groups.pgs
        core = build_model(cfg, pgs, image_token_id=image_token_id)
        self.config = core.config
        # Per-"token" loss mode: our loss callbacks return (sum, count) and megatron divides the
        # gradients by the global count in finalize_model_grads.
        self.config.calculate_per_token_loss = True
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            core.cuda()
        dist_opt = cfg.parallel.distributed_optimizer
        if dist_opt is None:
            # On GPUs with NCCL; not over gloo (CPU, or ranks sharing a GPU), whose CUDA
            # reduce-scatter support is not to be relied on.
            dist_opt = on_gpu and "nccl" in str(torch.distributed.get_backend(pgs.dp))
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=dist_opt,
            check_for_nan_in_grad=False,
            bucket_size=None if on_gpu else 10**9,
        )
        self.ddp_model = DistributedDataParallel(
            self.config, ddp_config, core, pg_collection=pgs
        )
        self.model: CopdModel = core
        self.chunks = [self.ddp_model]
        dtype = resolve_dtype(cfg.precision)
        o = cfg.optim
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            params_dtype=dtype,
            use_distributed_optimizer=dist_opt,
        )
        self.optimizer = get_megatron_optimizer(
            opt_config, self.chunks, use_gloo_process_groups=False, pg_collection=pgs
        )
        decay = max(1, total_steps, o.warmup_steps + 1)  # megatron asserts warmup < decay
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if o.warmup_steps else o.lr,
            max_lr=o.lr,
            min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_steps,
            lr_decay_steps=decay,
            lr_decay_style=o.lr_schedule,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=decay,
            wd_incr_style="constant",
        )
        self.config.no_sync_func = self.ddp_model.no_sync
        self.config.finalize_model_grads_func = partial(finalize_model_grads, pg_collection=pgs)
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.p2p = P2PCommunicator(pp_group=pgs.pp, config=self.config)
        self._fwd_bwd = get_forward_backward_func(pp_size=pgs.pp.size(), vp_size=None)

    # ------------------------------------------------------------------ forward / backward
    def forward_backward(
        self,
        micro_batches: list[dict],
        loss_fn: LossFn,
        seq_length: int,
        forward_only: bool = False,
    ) -> list[dict]:
        """Run megatron's schedule over ``micro_batches`` (all [mbs, seq_length]).

        Each micro-batch dict holds at least tokens, position_ids, attention_mask and optionally
        pixels (shapes may differ between micro-batches: token-budget batching); ``loss_fn``
        sees the last stage's output (logits [b, s, v/tp]) and the batch.
        Returns the per-micro-batch metric dicts (last pipeline stage only; [] elsewhere).
        """
        if not micro_batches:
            return []
        mbs = micro_batches[0]["tokens"].shape[0]
        it = iter(micro_batches)
        # Token-budget micro-batches differ in shape: the pipeline then sends each activation's
        # shape ahead of it (megatron's variable_seq_lengths).
        varying = len({tuple(b["tokens"].shape) for b in micro_batches}) > 1
        before = self.config.variable_seq_lengths
        self.config.variable_seq_lengths = before or varying

        def forward_step(data_iterator: Iterable, model):
            batch = next(data_iterator)
            output = model(
                input_ids=batch["tokens"],
                position_ids=batch["position_ids"],
                attention_mask=batch["attention_mask"],
                pixels=batch.get("pixels"),
            )
            return output, partial(_call_loss, loss_fn, batch)

        try:
            return self._fwd_bwd(
                forward_step_func=forward_step,
                data_iterator=it,
                model=self.chunks,
                num_microbatches=len(micro_batches),
                seq_length=seq_length,
                micro_batch_size=mbs,
                forward_only=forward_only,
                p2p_communicator=self.p2p,
                pg_collection=self.groups.pgs,
            )
        finally:
            self.config.variable_seq_lengths = before

    def train_step(
        self, micro_batches: list[dict], loss_fn: LossFn, seq_length: int
    ) -> StepResult:
        """Zero grads, forward/backward every micro-batch, clip, optimizer + LR step."""
        self.ddp_model.train()
        self.ddp_model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outs = self.forward_backward(micro_batches, loss_fn, seq_length)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        return StepResult(
            metrics=reduce_metrics(outs),
            grad_norm=None if grad_norm is None else float(grad_norm),
            skipped=not ok,
        )

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def _call_loss(loss_fn: LossFn, batch: dict, output: torch.Tensor):
    loss_sum, count, metrics = loss_fn(output, batch)
    count = torch.as_tensor(count, dtype=torch.int, device=loss_sum.device).clone()
    return loss_sum, count, metrics


def reduce_metrics(outs: list[dict]) -> dict[str, float]:
    """Combine per-micro-batch metrics: ``(sum, count)`` pairs are pooled, scalars averaged."""
    pooled: dict[str, list[float]] = {}
    for out in outs or []:
        for key, value in out.items():
            if isinstance(value, (tuple, list)) and len(value) == 2:
                acc = pooled.setdefault(key, [0.0, 0.0])
                acc[0] += float(value[0])
                acc[1] += float(value[1])
            else:
                acc = pooled.setdefault(key, [0.0, 0.0])
                acc[0] += float(value)
                acc[1] += 1.0
    return {k: (s / c if c else 0.0) for k, (s, c) in pooled.items()}


