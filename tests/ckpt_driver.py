"""A deterministic synthetic training loop over BranchModel with checkpoints and preemption,
run as one rank of a world (torchrun-style environment: RANK, WORLD_SIZE, MASTER_ADDR/PORT).

Used by tests/test_checkpointing.py to kill and resume real worker processes. Each step's data
comes from torch's global RNG and a position kept in the engine state, and the model has dropout,
so an exact resume needs the weights, the optimizer, the LR schedule, every RNG and the engine
state back. Writes into --out: ``losses_<branch>.jsonl`` (one line per step, branch's first
rank), ``weights_<rank>.pt`` at the end, ``events_<rank>.json`` (the manager's report lines).

Test-only switch: ``--hang-save N`` makes the shard writer of iteration N stop after writing its
shards (before ``.metadata``), so a test can kill the job in the middle of a save.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402


def build_config(args):
    from model_fixtures import tiny_config

    cfg = tiny_config(
        tp=args.tp, branches=tuple(args.branches.split(",")), num_layers=2,
        extra={"hidden_dropout": 0.1, "attention_dropout": 0.1},
    )
    cfg.run_dir = args.run_dir
    cfg.optim.lr = 1e-3
    cfg.optim.warmup_steps = 2
    cfg.optim.lr_schedule = "cosine"
    cfg.checkpoint.interval = args.interval
    cfg.checkpoint.keep_last = 2
    cfg.checkpoint.async_save = args.async_save
    cfg.checkpoint.grace_seconds = args.grace
    return cfg


def lm_loss(output, batch):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = output.transpose(0, 1).contiguous().clone()
    labels = batch["labels"].transpose(0, 1).contiguous()
    loss = vocab_parallel_cross_entropy(logits, labels, tp_group=lm_loss.tp_group)
    return loss.sum(), torch.tensor(loss.numel()), {"loss": (loss.sum().item(), loss.numel())}


def make_batches(position: int, branch: int, n: int = 2, batch: int = 2, seq: int = 16) -> list:
    """Data drawn from the global torch RNG (restored on resume) and the engine's position."""
    out = []
    for _ in range(n):
        tokens = torch.randint(6, 256, (batch, seq))
        tokens[:, 0] = 6 + (position * 7 + branch) % 200
        mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1).view(1, 1, seq, seq)
        out.append({
            "tokens": tokens,
            "labels": torch.roll(tokens, -1, dims=1),
            "position_ids": torch.arange(seq).unsqueeze(0).expand(batch, -1),
            "attention_mask": mask.expand(batch, 1, seq, seq),
        })
    return out


def install_hang(iteration: int, out_dir: str) -> None:
    from megatron_copd.checkpoint import branch_save
    from megatron_copd.checkpoint.ckpt_dirs import iter_name

    original = branch_save.SaveRequest._write

    def write_then_hang(self):
        original(self)
        if self.directory.name.startswith(iter_name(iteration)):
            open(os.path.join(out_dir, f"hanging_{os.environ['RANK']}"), "w").close()
            time.sleep(3600)

    branch_save.SaveRequest._write = write_then_hang


def run(args) -> int:
    import torch.distributed as dist

    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.distributed import init_distributed, shutdown
    from megatron_copd.runtime.exit_codes import EXIT_REQUEUE
    from megatron_copd.runtime.megatron_state import init_megatron_state
    from megatron_copd.training.branch_model import BranchModel
    from megatron_copd.training.checkpointing import CheckpointManager
    from megatron_copd.runtime.preemption import PreemptionHandler

    init_distributed()
    rank = dist.get_rank()
    if args.hang_save:
        install_hang(args.hang_save, args.out)
    cfg = build_config(args)
    layout = BranchLayout.from_world(cfg.branch_names, dist.get_world_size(), tp=args.tp)
    groups = build_branch_groups(layout)
    init_megatron_state(groups, cfg.seed + 1000 * groups.branch)
    model = BranchModel(cfg, groups, image_token_id=5, total_steps=args.total)
    lm_loss.tp_group = groups.pgs.tp
    ckpt = CheckpointManager(cfg.run_dir, groups, cfg, base_fingerprint="test-base")
    resumed = ckpt.load_latest(model)
    start = resumed.iteration if resumed else 0
    state = dict(resumed.engine_state) if resumed else {"position": 0}
    writer = dist.get_rank(groups.branch_group) == 0
    loss_path = os.path.join(args.out, f"losses_{groups.branch_name}.jsonl")
    code = 0
    with PreemptionHandler(cfg.checkpoint.grace_seconds) as stop:
        for it in range(start + 1, args.total + 1):
            batches = make_batches(state["position"], groups.branch)
            result = model.train_step(batches, lm_loss, seq_length=16)
            state["position"] += 1
            if writer:
                with open(loss_path, "a") as f:
                    f.write(json.dumps({"it": it, "loss": result.metrics["loss"].hex(),
                                        "grad_norm": float(result.grad_norm).hex(),
                                        "lr": model.lr, "resumed_from": start}) + "\n")
            time.sleep(args.step_sleep)
            if ckpt.after_step(it, model, lambda: dict(state), stop):
                code = EXIT_REQUEUE
                signal_to_exit = stop.elapsed()
                break
        else:
            ckpt.save(args.total, model, dict(state))
    ckpt.close()
    weights = {k: v.detach().clone() for k, v in model.model.state_dict().items()
               if torch.is_tensor(v)}
    torch.save(weights, os.path.join(args.out, f"weights_{rank}.pt"))
    report = {"events": ckpt.events, "start": start, "code": code,
              "rng_restored": resumed.rng_restored if resumed else None}
    if code:
        report["signal_to_save_done_s"] = signal_to_exit
    with open(os.path.join(args.out, f"events_{rank}.json"), "w") as f:
        json.dump(report, f)
    shutdown()
    return code


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--total", type=int, default=8)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--branches", default="text,image")
    p.add_argument("--interval", type=int, default=2)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--grace", type=float, default=60.0)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--hang-save", type=int, default=0)
    return run(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
