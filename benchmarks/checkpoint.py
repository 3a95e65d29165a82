"""Checkpoint save/load time and size on disk: megatron-copd's CheckpointManager (group-local
torch_dist, sync and async) next to megatron-core's stock ``dist_checkpointing.save`` of the same
state and a plain ``torch.save`` of the same tensors, one process on CPU.

    PYTHONPATH=. python benchmarks/checkpoint.py [--models toy 100m] [--repeats 3]

Models: ``toy`` = the model of megatron_copd/configs/toy_copd.yaml (hidden 128, 4 layers,
vocab 512, CLIP-style vision tower); ``100m`` = a ~100M-parameter text LM (hidden 768, 12
layers, 12 heads / 4 KV heads, FFN 2048, vocab 32000, tied embeddings). fp32 weights + Adam
moments (the full training state). Figures are the median of --repeats.

"blocked" is how long the training loop waits in ``save()``; "total" is until the checkpoint
is published (for async: ``wait()``); "step during write" is a training step that runs while
an async write is in flight, next to a step without one.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_copd.config import RunConfig, default_config_path  # noqa: E402
from megatron_copd.config_base import from_dict, load_yaml  # noqa: E402
from megatron_copd.runtime.branches import BranchLayout, build_branch_groups  # noqa: E402
from megatron_copd.runtime.distributed import LaunchEnv, free_port, init_distributed  # noqa: E402
from megatron_copd.runtime.megatron_state import init_megatron_state  # noqa: E402

MODELS = {
    "toy": None,  # from the embedded toy config
    "100m": {"vocab_size": 32000, "hidden_size": 768, "num_layers": 12,
             "num_attention_heads": 12, "num_query_groups": 4, "ffn_hidden_size": 2048,
             "max_sequence_length": 256},
}


def build(name: str):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_copd.training.branch_model import BranchModel

    model_cfg = MODELS[name] or load_yaml(default_config_path())["model"]
    cfg = from_dict(RunConfig, {
        "branches": [{"name": "bench", "domains": ["text"]}], "model": model_cfg,
        "precision": {"dtype": "fp32"},
        "checkpoint": {"keep_last": 2},
    })
    groups = build_branch_groups(BranchLayout(("bench",)))
    init_megatron_state(groups, 1234)
    branch = BranchModel(cfg, groups, image_token_id=5, total_steps=100)
    vocab, seq = cfg.model.vocab_size, 32

    def loss_fn(output, batch):
        logits = output.transpose(0, 1).contiguous().clone()
        labels = batch["labels"].transpose(0, 1).contiguous()
        loss = vocab_parallel_cross_entropy(logits, labels, tp_group=groups.pgs.tp)
        return loss.sum(), torch.tensor(loss.numel()), {"loss": (loss.sum().item(), loss.numel())}

    tokens = torch.randint(6, vocab, (1, seq))
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1).view(1, 1, seq, seq)
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "attention_mask": mask,
             "position_ids": torch.arange(seq).unsqueeze(0)}

    def step() -> float:
        t0 = time.perf_counter()
        branch.train_step([batch], loss_fn, seq_length=seq)
        return time.perf_counter() - t0

    step()  # Adam moments exist from here on: the full training state
    return cfg, groups, branch, step


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench(name: str, repeats: int, root: Path) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_copd.training.checkpointing import CheckpointManager
    from megatron_copd.training.train_state import build_train_state

    cfg, groups, branch, step = build(name)
    n_params = sum(p.numel() for p in branch.model.parameters())
    run = root / name
    out: dict = {"params": n_params}
    steps_plain = [step() for _ in range(3)]
    out["step"] = statistics.median(steps_plain)

    it = 0
    for mode in ("sync", "async"):
        blocked, total, during = [], [], []
        for _ in range(repeats):
            it += 1
            ckpt = CheckpointManager(run, groups, cfg)
            t0 = time.perf_counter()
            ckpt.save(it, branch, {"it": it}, async_save=mode == "async")
            blocked.append(time.perf_counter() - t0)
            if mode == "async":
                during.append(step())
            ckpt.wait()
            total.append(time.perf_counter() - t0)
        out[f"{mode}_blocked"] = statistics.median(blocked)
        out[f"{mode}_total"] = statistics.median(total)
        if during:
            out["step_during_write"] = statistics.median(during)
    latest = run / "checkpoints" / "bench" / (run / "checkpoints" / "bench" / "latest").read_text(
    ).strip()
    out["size"] = dir_size(latest)

    loads = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        CheckpointManager(run, groups, cfg).load_latest(branch)
        loads.append(time.perf_counter() - t0)
    out["load"] = statistics.median(loads)

    stock = []
    for i in range(repeats):
        d = root / f"{name}_stock_{i}"
        d.mkdir()
        t0 = time.perf_counter()
        dist_checkpointing.save(build_train_state(branch, it, {"it": it}), str(d))
        stock.append(time.perf_counter() - t0)
    out["stock_save"] = statistics.median(stock)
    out["stock_first"] = stock[0]  # megatron starts its 'spawn' Manager process on first use

    plain = []
    for i in range(repeats):
        p = root / f"{name}_plain_{i}.pt"
        t0 = time.perf_counter()
        torch.save({"model": branch.model.state_dict(),
                    "optimizer": branch.optimizer.state_dict()}, p)
        plain.append(time.perf_counter() - t0)
    out["plain_save"] = statistics.median(plain)
    out["plain_size"] = p.stat().st_size
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["toy", "100m"], choices=list(MODELS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    init_distributed(LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    root = Path(tempfile.mkdtemp(prefix="copd_ckpt_bench_", dir=args.dir))
    try:
        rows = {m: bench(m, args.repeats, root) for m in args.models}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\ncheckpoint benchmark (1 process, CPU, fp32 weights + Adam; median of "
          f"{args.repeats}; torch {torch.__version__}, {torch.get_num_threads()} threads)")
    head = (f"{'model':>6} {'params':>8} {'size MB':>8} {'sync s':>7} {'async blk':>9} "
            f"{'async tot':>9} {'load s':>7} {'stock s':>8} {'torch.save':>10} "
            f"{'step s':>7} {'step|write':>10}")
    print(head)
    for m, r in rows.items():
        print(f"{m:>6} {r['params'] / 1e6:7.1f}M {r['size'] / 2**20:8.1f} {r['sync_total']:7.3f} "
              f"{r['async_blocked']:9.3f} {r['async_total']:9.3f} {r['load']:7.3f} "
              f"{r['stock_save']:8.3f} {r['plain_save']:10.3f} {r['step']:7.3f} "
              f"{r['step_during_write']:10.3f}")
    for m, r in rows.items():
        mb = r["size"] / 2**20
        print(f"{m}: sync save {mb / r['sync_total']:.0f} MB/s, load {mb / r['load']:.0f} MB/s; "
              f"async blocks training {r['async_blocked'] / r['sync_total']:.0%} of a sync save; "
              f"stock megatron save / ours = {r['stock_save'] / r['sync_total']:.2f}x; "
              f"torch.save file {r['plain_size'] / 2**20:.1f} MB")
    first = next(iter(rows.values()))["stock_first"]
    print(f"first stock dist_checkpointing.save in the process: {first:.2f}s (it starts "
          f"megatron's 'spawn' results-queue process; CheckpointManager starts none)")


if __name__ == "__main__":
    main()
