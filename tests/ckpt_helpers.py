"""Real and synthetic torch_dist checkpoints for the checkpoint-tool tests.

Real ones come from the project's model at several layouts in ONE gloo world of 2 processes
(megatron start-up is the slow part): a base, then branches that load the base, move their
weights by a branch-specific amount and save at TP=1 (DP=2), TP=2 and PP=2. Synthetic ones are
written with TorchDistWriter (fast; for refusal and format tests).
"""

from __future__ import annotations

from pathlib import Path

import torch
from model_fixtures import IMAGE_TOKEN, lm_batch, tiny_config

from megatron_copd.checkpoint.meta import make_meta
from megatron_copd.checkpoint.torch_dist_io import TorchDistWriter

LAYOUTS = {"tp1": dict(tp=1, pp=1), "tp2": dict(tp=2, pp=1), "pp2": dict(tp=1, pp=2)}


def _build(world: int, tp: int, pp: int, seed: int):
    from megatron_copd.models.factory import build_model
    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.megatron_state import init_megatron_state

    cfg = tiny_config(tp, pp, vision=True)
    groups = build_branch_groups(BranchLayout(("a",), tp=tp, pp=pp, dp=world // (tp * pp)))
    init_megatron_state(groups, seed)
    return cfg, groups, build_model(cfg, groups.pgs, image_token_id=IMAGE_TOKEN)


def world_worker(rank, world, root: str, branches: list[tuple[str, str, float]], layouts):
    """The whole real-model story in one gloo world (megatron start-up is the slow part):

    1. save ``root/base`` (TP=1);
    2. each (name, layout, shift) branch: base loaded at that layout, every parameter moved by
       ``shift * sin(arange)`` plus seeded noise, saved at that layout as ``root/<name>``;
    3. rank 0 merges all branches into ``root/merged`` with the plain function API (no process
       group involved, as the CoPD engine's final merge does);
    4. the merged checkpoint loaded at each of ``layouts`` and saved again as
       ``root/resaved_<layout>`` (compared independently by the test); returns the logits per
       layout (TP-gathered; only without PP).
    """
    import torch.distributed as dist
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_copd.checkpoint.fingerprint import compute_fingerprint
    from megatron_copd.checkpoint.merge import merge_checkpoints
    from megatron_copd.checkpoint.model_io import load_model, save_model

    root = Path(root)
    cfg, groups, model = _build(world, 1, 1, seed=7)
    save_model(model, groups.pgs, root / "base", make_meta(cfg.model, "base", None))
    fingerprint = compute_fingerprint(root / "base")
    for i, (name, layout, shift) in enumerate(branches):
        cfg, groups, model = _build(world, **LAYOUTS[layout], seed=100 + i)
        load_model(model, groups.pgs, root / "base")
        gen = torch.Generator().manual_seed(1000 + i)  # same on TP peers: fine, shards differ
        with torch.no_grad():
            for p in model.parameters():
                p.add_(shift * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).view_as(p))
                p.add_(0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        save_model(model, groups.pgs, root / name, make_meta(cfg.model, name, fingerprint))
    if rank == 0:
        merge_checkpoints([root / name for name, _, _ in branches], root / "merged")
    dist.barrier()
    logits = {}
    for layout in layouts:
        cfg, groups, model = _build(world, **LAYOUTS[layout], seed=999)
        meta = load_model(model, groups.pgs, root / "merged")
        save_model(model, groups.pgs, root / f"resaved_{layout}", meta)
        if LAYOUTS[layout]["pp"] == 1:
            logits[layout] = gather_from_tensor_model_parallel_region(
                _logits(model), group=groups.pgs.tp
            )
    return fingerprint, logits


def _logits(model) -> torch.Tensor:
    b = lm_batch(images_at=2)
    with torch.no_grad():
        return model(b["tokens"], b["position_ids"], b["attention_mask"], pixels=b["pixels"])


# -- synthetic checkpoints ------------------------------------------------------------------


def write_synthetic(
    path: Path,
    tensors: dict[str, torch.Tensor],
    *,
    chunk_rows: int = 3,
    meta: dict | None = None,
    objects: dict[str, object] | None = None,
    num_files: int = 2,
) -> Path:
    """A torch_dist checkpoint whose tensors are cut into ``chunk_rows``-row chunks along dim 0
    (dim -1 for 1-D) and spread over ``num_files`` files."""
    with TorchDistWriter(path, num_files=num_files) as w:
        i = 0
        for key, t in tensors.items():
            w.declare_tensor(key, tuple(t.shape), t.dtype)
            if t.dim() == 0:
                w.write_chunk(key, (), t)
                continue
            for start in range(0, t.shape[0], chunk_rows):
                offsets = (start,) + (0,) * (t.dim() - 1)
                w.write_chunk(key, offsets, t[start : start + chunk_rows].clone(), i % num_files)
                i += 1
        for key, obj in (objects or {}).items():
            w.write_object(key, obj)
        w.write_common_state({})
        w.meta = meta if meta is not None else synthetic_meta("x", "sha256:base")
        w.commit()
    return path


def synthetic_meta(branch: str, fingerprint: str | None, **model) -> dict:
    return make_meta({"hidden_size": 8, **model}, branch, fingerprint)
