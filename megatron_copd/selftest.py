"""`copd selftest`: a short distributed check of a job's layout before hours are spent on it.

Run it the way training runs (plainly, under torchrun, or through slurm/launch.sh). Every rank:
1. initialises torch.distributed from the launcher's environment;
2. builds the branch process groups (``runtime.branches``) and all-reduces its rank over every
   group it belongs to (world, branch, cross-branch, TP, CP, DP, PP, model-parallel, embedding),
   checking the sum against the group's membership;
3. exchanges a tensor with its peer rank in every other branch (``batch_isend_irecv``: the path
   rollouts and teacher log-probs take) and checks what arrived;
4. builds this rank's stage of the configured model and runs one forward pass through the
   pipeline (hidden states sent stage to stage), checking the logits are finite;
5. optionally stays up for ``--hold`` seconds answering preemption signals the way training
   does: all ranks agree on the stop, then exit with ``EXIT_REQUEUE``.

Rank 0 prints one line of timings per rank and appends a summary line to
``<run_dir>/selftest.jsonl``. Exit status: 0 all checks passed, 1 a check failed,
``EXIT_REQUEUE`` stopped by a preemption signal during ``--hold``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_copd.config import RunConfig, load_config
from megatron_copd.model_size import human
from megatron_copd.runtime.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_REQUEUE
from megatron_copd.runtime.launch import relaunch_if_needed


def _relaunch_argv(args: argparse.Namespace) -> list[str]:
    argv = ["selftest"]
    if args.config:
        argv.append(args.config)
    argv += list(args.overrides)
    argv += ["--hold", str(args.hold), "--p2p-mb", str(args.p2p_mb), "--timeout", str(args.timeout)]
    if args.no_model:
        argv.append("--no-model")
    return argv


def selftest_command(args: argparse.Namespace) -> int:
    from megatron_copd.runtime.distributed import launch_env

    env = launch_env()
    world = env.world_size if env.launcher != "single" else None
    cfg = load_config(args.config, args.overrides, world_size=world)
    rc = relaunch_if_needed(cfg.world_size, _relaunch_argv(args))
    if rc is not None:
        return rc
    return run_selftest(cfg, args)


# ---------------------------------------------------------------------------------------------


def run_selftest(cfg: RunConfig, args: argparse.Namespace) -> int:
    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.distributed import init_distributed, launch_env, shutdown

    t0 = time.perf_counter()
    env = init_distributed(launch_env(), timeout_s=args.timeout)
    rank = dist.get_rank()
    res: dict[str, Any] = {
        "rank": rank,
        "host": socket.gethostname().split(".")[0],
        "backend": dist.get_backend(),
        "device": str(_device()),
        "init_s": time.perf_counter() - t0,
        "errors": [],
    }
    t = time.perf_counter()
    layout = BranchLayout(
        cfg.branch_names,
        tp=cfg.parallel.tp,
        pp=cfg.parallel.pp,
        dp=cfg.parallel.dp,
        cp=cfg.parallel.cp,
    )
    groups = build_branch_groups(layout)
    res["groups_s"] = time.perf_counter() - t
    res.update(branch=groups.branch_name, coords=groups.coords)

    res["allreduce_ms"] = _check_groups(groups, res["errors"])
    res["p2p_ms"], res["p2p_mbps"] = _exchange_with_peers(groups, args.p2p_mb, res["errors"])
    if args.no_model:
        res["build_s"] = res["forward_s"] = None
    else:
        res["build_s"], res["forward_s"] = _model_forward(cfg, groups, res)
    preempted = _hold(args.hold) if args.hold > 0 else None
    res["total_s"] = time.perf_counter() - t0
    everyone: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(everyone, res)
    failed = any(r["errors"] for r in everyone)
    if rank == 0:
        summary = _summary(cfg, env.launcher, layout, everyone, preempted)
        print(_report(summary), flush=True)
        _append_jsonl(Path(cfg.run_dir) / "selftest.jsonl", summary)
    dist.barrier()
    shutdown()
    if failed:
        return EXIT_FAILURE
    return EXIT_REQUEUE if preempted else EXIT_OK


def _device() -> torch.device:
    from megatron_copd.runtime.distributed import device

    return device()


def _sync(fn, *a):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(*a)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t) * 1e3


def _check_groups(groups, errors: list[str]) -> dict[str, float]:
    """All-reduce this rank's id over each of its groups; the sum must match the membership."""
    pgs = groups.pgs
    named = {
        "world": dist.group.WORLD,
        "branch": groups.branch_group,
        "cross": groups.cross_group,
        "tp": pgs.tp,
        "cp": pgs.cp,
        "dp": pgs.dp,
        "pp": pgs.pp,
        "mp": pgs.mp,
        "embd": pgs.embd,
    }
    rank = groups.rank
    timings = {}
    # Every rank iterates the same names in the same order; a rank outside a group (embd on a
    # middle pipeline stage) skips it, which is safe because the group excludes it anyway.
    for name, group in named.items():
        if group is None:
            continue
        members = dist.get_process_group_ranks(group)
        value = torch.tensor([float(rank)], dtype=torch.float64, device=_device())
        _, ms = _sync(dist.all_reduce, value, dist.ReduceOp.SUM, group)
        timings[name] = ms
        if value.item() != float(sum(members)):
            errors.append(
                f"rank {rank}: all-reduce over the {name} group {members} gave {value.item():.0f}, "
                f"expected {sum(members)}"
            )
    return timings


def _exchange_with_peers(groups, mb: float, errors: list[str]) -> tuple[float | None, float | None]:
    """Send a rank-stamped tensor to every peer in the other branches; check what comes back."""
    layout = groups.layout
    n = max(1, int(mb * 2**20 / 4))
    peers = [groups.peer(b) for b in range(layout.num_branches) if b != groups.branch]
    if not peers:
        return None, None
    dev = _device()
    mine = torch.full((n,), float(groups.rank), dtype=torch.float32, device=dev)
    inbox = {p: torch.empty(n, dtype=torch.float32, device=dev) for p in peers}

    def exchange() -> None:
        from megatron_copd.runtime.distributed import batch_p2p

        ops = []
        for p in peers:
            ops.append(dist.P2POp(dist.isend, mine, p))
            ops.append(dist.P2POp(dist.irecv, inbox[p], p))
        batch_p2p(ops)

    exchange()  # warm-up (connection set-up on first use)
    reps = 3
    _, ms = _sync(lambda: [exchange() for _ in range(reps)])
    ms /= reps
    for p, buf in inbox.items():
        if not torch.all(buf == float(p)):
            errors.append(f"rank {groups.rank}: data from peer rank {p} arrived corrupted")
    mbps = 2 * len(peers) * n * 4 / 2**20 / (ms / 1e3) if ms > 0 else 0.0
    return ms, mbps


def _model_forward(cfg: RunConfig, groups, res: dict) -> tuple[float | None, float | None]:
    from megatron_copd.models.factory import build_model, resolve_dtype
    from megatron_copd.runtime.megatron_state import init_megatron_state

    if cfg.parallel.cp > 1:
        res["notes"] = "forward skipped: context parallelism needs the training data path"
        return None, None
    t = time.perf_counter()
    init_megatron_state(groups, cfg.seed)
    m = cfg.model
    image_token_id = m.vocab_size - 1 if m.vision is not None else None
    model = build_model(cfg, groups.pgs, image_token_id=image_token_id)
    model.eval()
    build_s = time.perf_counter() - t
    res["params"] = sum(p.numel() for p in model.parameters())

    dev = _device()
    gen = torch.Generator().manual_seed(cfg.seed)
    batch, seq = 2, 32
    if cfg.parallel.sequence_parallel:
        seq = -(-seq // cfg.parallel.tp) * cfg.parallel.tp
    tokens = torch.randint(0, m.vocab_size - 1, (batch, seq), generator=gen)
    pixels = None
    if m.vision is not None:
        tpi = m.vision.tokens_per_image
        if tpi < seq:
            tokens[0, 1 : 1 + tpi] = image_token_id
            pixels = torch.rand((1, 3, m.vision.image_size, m.vision.image_size), generator=gen).to(
                dev
            )
    tokens = tokens.to(dev)
    positions = torch.arange(seq, device=dev).unsqueeze(0).expand(batch, -1)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=dev), 1)[None, None]

    pp, stage = groups.pgs.pp, groups.pp_rank
    dtype = resolve_dtype(cfg.precision)
    s_local = seq // cfg.parallel.tp if cfg.parallel.sequence_parallel else seq
    hidden_shape = (s_local, batch, m.hidden_size)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            if not groups.is_first_stage:
                h = torch.empty(hidden_shape, dtype=dtype, device=dev)
                dist.recv(h, src=dist.get_global_rank(pp, stage - 1), group=pp)
                model.set_input_tensor(h)
            out = model(tokens, positions, mask, pixels=pixels if groups.is_first_stage else None)
            if not groups.is_last_stage:
                dist.send(out.contiguous(), dst=dist.get_global_rank(pp, stage + 1), group=pp)
            return out

    out, ms = _sync(forward)
    if groups.is_last_stage:
        expected = (batch, seq, m.vocab_size // cfg.parallel.tp)
        if tuple(out.shape) != expected:
            res["errors"].append(
                f"rank {groups.rank}: logits shape {tuple(out.shape)}, expected {expected}"
            )
        elif not torch.isfinite(out).all():
            res["errors"].append(f"rank {groups.rank}: the forward pass produced non-finite logits")
    return build_s, ms / 1e3


def _hold(seconds: float) -> str | None:
    """Wait like a training loop; returns the signal name if every rank agreed to stop.

    Each poll is one MAX all-reduce of (2 = signal received, 1 = time is up, 0 = go on), so all
    ranks leave the loop together even though their clocks and signals differ a little.
    """
    from megatron_copd.runtime.preemption import PreemptionHandler

    if dist.get_rank() == 0:
        print(
            f"copd selftest: holding {seconds:.0f} s (SIGTERM/SIGUSR1 -> checkpoint-free requeue)",
            flush=True,
        )
    start = time.monotonic()
    with PreemptionHandler() as watcher:
        while True:
            local = 2 if watcher.signalled else int(time.monotonic() - start > seconds)
            flag = torch.tensor([local], dtype=torch.int32, device=_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() == 2:
                name = watcher.signal_name or "a peer's signal"
                return name
            if flag.item() == 1:
                return None
            time.sleep(0.2)


# ---------------------------------------------------------------------------------------------


def _summary(cfg, launcher, layout, everyone: list[dict], preempted: str | None) -> dict:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "launcher": launcher,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "layout": layout.describe(),
        "world_size": len(everyone),
        "ok": not any(r["errors"] for r in everyone),
        "preempted_by": preempted,
        "errors": [e for r in everyone for e in r["errors"]],
        "ranks": everyone,
    }


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _report(s: dict) -> str:
    lines = [
        (
            f"copd selftest: {s['layout']}, launcher {s['launcher']}, "
            f"backend {s['ranks'][0]['backend']}, restart {s['restart_count']}"
        ),
        (
            f"{'rank':>4} {'host':<12} {'branch':<10} {'tp':>2} {'cp':>2} {'dp':>3} {'pp':>2} "
            f"{'init_s':>7} {'groups_s':>8} {'ar_max_ms':>9} {'p2p_ms':>8} {'p2p_MB/s':>9} "
            f"{'params':>9} {'build_s':>7} {'fwd_s':>6}  device"
        ),
    ]
    for r in s["ranks"]:
        c = r.get("coords", {})
        ar = max(r.get("allreduce_ms", {}).values(), default=None)
        lines.append(
            f"{r['rank']:>4} {r['host'][:12]:<12} {str(r.get('branch', '?'))[:10]:<10} "
            f"{c.get('tp', 0):>2} {c.get('cp', 0):>2} {c.get('dp', 0):>3} {c.get('pp', 0):>2} "
            f"{_fmt(r['init_s'], '7.2f')} {_fmt(r.get('groups_s'), '8.2f')} "
            f"{_fmt(ar, '9.2f')} {_fmt(r.get('p2p_ms'), '8.2f')} {_fmt(r.get('p2p_mbps'), '9.1f')} "
            f"{human(r['params']) if r.get('params') else '-':>9} "
            f"{_fmt(r.get('build_s'), '7.2f')} {_fmt(r.get('forward_s'), '6.3f')}  {r['device']}"
        )
    notes = {r.get("notes") for r in s["ranks"] if r.get("notes")}
    lines += [f"note: {n}" for n in sorted(notes)]
    if s["ok"]:
        end = "OK" if not s["preempted_by"] else f"OK, stopped by {s['preempted_by']} (requeue)"
        lines.append(f"copd selftest: {end}")
    else:
        lines += [f"FAILED: {e}" for e in s["errors"]]
    return "\n".join(lines)


def _append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
