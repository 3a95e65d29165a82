"""Per-branch training checkpoints: atomic, resumable bit-exactly, reshardable, preemption-safe.

``run_dir/checkpoints/<branch>/iter_<N>/`` is a torch_dist checkpoint written by that branch's
ranks only (``checkpoint.branch_save``), while the other branches write theirs at the same time.
What it holds: ``training.train_state``. Directory rules (``.tmp`` then rename, the
``copd_meta.json`` completion marker, ``latest``): ``checkpoint.ckpt_dirs``.

Branches train in lockstep (they exchange rollouts and teacher log-probs every step), so they
must resume from the *same* iteration. The manager therefore agrees over a sync group (default:
the whole world) on three things: when an asynchronous save is finalised, that a new checkpoint
is published in every branch before old ones are deleted, and which iteration to resume from
(the newest one complete in every branch). Every public method that communicates says so; call
those on every rank of the world at the same point of the loop.

Engine contract (every rank)::

    ckpt = CheckpointManager(cfg.run_dir, groups, cfg, base_fingerprint=fp)
    resumed = ckpt.load_latest(branch_model)          # None: fresh start
    start = resumed.iteration if resumed else 0        # + resumed.engine_state
    with PreemptionHandler(cfg.checkpoint.grace_seconds) as stop:
        for it in range(start + 1, total + 1):
            ... one training step ...
            if ckpt.after_step(it, branch_model, engine_state_fn, stop):
                ckpt.close()
                return EXIT_REQUEUE
        ckpt.save(total, branch_model, engine_state_fn())   # no-op if after_step just saved it
        ckpt.close()
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_copd.checkpoint.branch_save import SaveRequest, save_sharded
from megatron_copd.checkpoint.ckpt_dirs import (
    DELETING_SUFFIX,
    META_FILE,
    TMP_SUFFIX,
    iter_name,
    publish_dir,
    read_meta,
    scan_branch_dir,
    verify_files,
    write_latest,
    write_text_atomic,
)
from megatron_copd.config import RunConfig
from megatron_copd.config_base import to_dict
from megatron_copd.errors import CheckpointError
from megatron_copd.runtime.branches import BranchGroups
from megatron_copd.runtime.preemption import PreemptionHandler
from megatron_copd.training.train_state import (
    build_train_state,
    optimizer_format,
    restore_train_state,
)

log = logging.getLogger("megatron_copd.checkpoint")

FORMAT = "megatron-copd/train-state"
FORMAT_VERSION = 1
# Model fields that do not change any weight's shape or meaning: a checkpoint loads across them.
_NOT_ARCHITECTURE = {"init_std", "extra", "max_sequence_length", "vision.max_frames"}

EngineState = dict | Callable[[], dict] | None


@dataclass
class Resumed:
    """What :meth:`CheckpointManager.load_latest` restored."""

    iteration: int
    engine_state: dict | None
    path: Path
    rng_restored: bool
    """False when the layout changed (per-rank RNG streams are then re-seeded, not restored)."""


@dataclass
class _Pending:
    iteration: int
    tmp: Path
    final: Path
    request: SaveRequest
    meta: dict
    started: float
    blocking_seconds: float


class CheckpointManager:
    """Save / resume one branch's training state under ``run_dir/checkpoints/<branch>/``."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        groups: BranchGroups,
        cfg: RunConfig,
        *,
        base_fingerprint: str | None = None,
        sync_group=None,
        tokenizer_dir: str | os.PathLike | None = None,
    ) -> None:
        self.root = Path(run_dir) / "checkpoints"
        # Recorded in every checkpoint (and so in the merged one): the export needs no
        # --tokenizer for a run's own checkpoints.
        self.tokenizer_dir = None if tokenizer_dir is None else str(Path(tokenizer_dir).resolve())
        self.groups = groups
        self.cfg = cfg
        self.ccfg = cfg.checkpoint
        self.base_fingerprint = base_fingerprint
        self.sync_group = sync_group  # None: the whole world
        self.branch = groups.branch_name
        self.branch_dir = self.root / self.branch
        self.is_writer = dist.get_rank(groups.branch_group) == 0
        self._pending: _Pending | None = None
        self.events: list[str] = []
        self.last_saved: int | None = None
        self.last_save_seconds: float | None = None
        """Wall time of the last save as if it had been synchronous (plan + write + finalise)."""
        self.last_blocking_seconds: float | None = None
        """Time the last save() kept the training loop waiting."""
        self._check_branch_dirs()

    # ------------------------------------------------------------------------------ helpers
    def _info(self, msg: str, warn: bool = False) -> None:
        """Report one line (the branch's first rank only); kept in ``self.events`` too."""
        if self.is_writer:
            self.events.append(msg)
            log.log(logging.WARNING if warn else logging.INFO, "[%s] %s", self.branch, msg)

    def _check_branch_dirs(self) -> None:
        if not self.root.is_dir():
            return
        known = set(self.cfg.branch_names)
        for entry in sorted(self.root.iterdir()):
            if entry.is_dir() and entry.name not in known:
                raise CheckpointError(
                    f"{entry}: checkpoints of branch {entry.name!r}, which the config does not "
                    f"have (branches: {', '.join(self.cfg.branch_names)}); move it out of "
                    f"{self.root} or use another run_dir"
                )

    def _agree(self, error: str | None) -> None:
        """Raise the same CheckpointError on every rank of the sync group if any rank failed
        (a rank that raised alone would leave the others blocked in the next collective)."""
        errors: list[str | None] = [None] * dist.get_world_size(self.sync_group)
        dist.all_gather_object(errors, error, group=self.sync_group)
        first = error or next((e for e in errors if e), None)
        if first:
            raise CheckpointError(first)

    def _all_true(self, value: bool) -> bool:
        t = torch.tensor([1 if value else 0], dtype=torch.int32, device=_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.sync_group)
        return bool(t.item())

    def _any_true(self, value: bool) -> bool:
        t = torch.tensor([1 if value else 0], dtype=torch.int32, device=_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.sync_group)
        return bool(t.item())

    def meta(self, branch_model, iteration: int) -> dict:
        layout = self.groups.layout
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "branch": self.branch,
            "iteration": iteration,
            "model": to_dict(self.cfg.model),
            "layout": {
                "tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "cp": layout.cp,
                "branches": list(layout.names),
            },
            "optimizer_format": optimizer_format(branch_model),
            "precision": str(branch_model.config.params_dtype).replace("torch.", ""),
            "base_fingerprint": self.base_fingerprint,
            "tokenizer": self.tokenizer_dir,
            "saved_at": datetime.datetime.now(datetime.UTC).isoformat(),
        }

    # --------------------------------------------------------------------------------- save
    def save(
        self,
        iteration: int,
        branch_model,
        state: EngineState = None,
        *,
        async_save: bool | None = None,
    ) -> None:
        """Write ``iter_<iteration>`` of this branch (collective over the sync group). A no-op
        (after finishing pending writes) when ``iteration`` is already saved.

        Synchronous: returns when the checkpoint is published and ``latest`` updated.
        Asynchronous (``checkpoint.async_save`` or ``async_save=True``): returns after planning
        and a host snapshot of the tensors; the files are written by a thread and published by a
        later :meth:`maybe_finalize` / :meth:`wait` / :meth:`save` once every rank finished.
        """
        self.wait()
        if self.last_saved == iteration:
            return  # e.g. the final save right after an interval save of the same step
        background = self.ccfg.async_save if async_save is None else async_save
        engine_state = state() if callable(state) else state
        t0 = time.perf_counter()
        name = iter_name(iteration)
        tmp = self.branch_dir / (name + TMP_SUFFIX)
        final = self.branch_dir / name
        error = None
        if self.is_writer:
            try:
                self.branch_dir.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                if final.exists():
                    # A checkpoint from a discarded future (resumed from an earlier iteration).
                    self._info(f"replacing the existing {final.name} (newer than the resume "
                               f"point)", warn=True)
                    _remove_dir(final)
                tmp.mkdir()
            except OSError as e:
                error = f"{tmp}: cannot create the checkpoint directory ({e})"
        # Also the barrier that keeps every rank from writing before the directory exists.
        self._agree(error)
        sharded = build_train_state(branch_model, iteration, engine_state)
        request = save_sharded(sharded, tmp, self.groups.branch_group, background=background)
        blocking = time.perf_counter() - t0
        self._pending = _Pending(
            iteration, tmp, final, request, self.meta(branch_model, iteration), t0, blocking
        )
        if not background:
            self._finalize()
        self.last_blocking_seconds = time.perf_counter() - t0

    def maybe_finalize(self, blocking: bool = False) -> bool:
        """Publish a pending asynchronous save if every rank finished writing (collective over
        the sync group: one small all-reduce; call once per step on every rank). Returns True
        when a checkpoint was published by this call."""
        if self._pending is None:
            return False
        if not blocking and not self._all_true(self._pending.request.written_locally()):
            return False
        self._finalize()
        return True

    def wait(self) -> None:
        """Block until a pending save is published (collective over the sync group)."""
        self.maybe_finalize(blocking=True)

    def close(self) -> None:
        self.wait()

    def _finalize(self) -> None:
        p = self._pending
        assert p is not None
        self._pending = None
        error = None
        try:
            # .metadata + metadata.json; raises on every rank of the branch if a write failed.
            p.request.finalize()
            if self.is_writer:
                write_text_atomic(p.tmp / META_FILE, _json(p.meta))
                publish_dir(p.tmp, p.final)
        except (CheckpointError, OSError) as e:
            error = str(e) if isinstance(e, CheckpointError) else f"{p.tmp}: {e}"
        # Every branch has published iter_N before any branch moves `latest` or deletes (and a
        # failure anywhere raises everywhere: no branch is left waiting for another).
        self._agree(error)
        error = None
        if self.is_writer:
            try:
                write_latest(self.branch_dir, p.iteration)
                self._retention(p.iteration)
            except OSError as e:
                error = f"{self.branch_dir}: updating latest / retention failed ({e})"
        self._agree(error)
        total = time.perf_counter() - p.started
        if p.request.is_background:
            cost = p.blocking_seconds + (p.request.write_seconds or 0.0)
            how = f"async: {cost:.2f}s of work, training blocked {p.blocking_seconds:.2f}s"
        else:
            cost = total
            how = f"sync: {total:.2f}s"
        self.last_save_seconds = cost
        self.last_saved = p.iteration
        self._info(f"saved {p.final} ({how})")

    def _retention(self, newest: int) -> None:
        """Keep the last ``keep_last`` (<=0: all) and every ``keep_every``-th; drop leftovers of
        crashed writes/deletes. Checkpoints newer than ``newest`` (from a discarded future) are
        left alone until overwritten."""
        scan = scan_branch_dir(self.branch_dir)
        for n in retention_victims(scan.complete, newest, self.ccfg.keep_last,
                                   self.ccfg.keep_every):
            _remove_dir(scan.complete[n])
        for entry in self.branch_dir.iterdir():
            if entry.is_dir() and entry.name.startswith("iter_") and (
                entry.name.endswith(TMP_SUFFIX) or entry.name.endswith(DELETING_SUFFIX)
            ):
                shutil.rmtree(entry, ignore_errors=True)

    # ----------------------------------------------------------------------- preemption
    def after_step(
        self,
        iteration: int,
        branch_model,
        state: EngineState,
        preemption: PreemptionHandler | None = None,
    ) -> bool:
        """The once-per-step call (every rank, after step ``iteration`` completed).

        Publishes a finished async save, checks the preemption flag (agreed over the world),
        saves every ``checkpoint.interval`` steps. Returns True when the process must stop now:
        a checkpoint of this step has been written (or the grace period did not allow it) and
        the engine should call :meth:`close` and exit with ``EXIT_REQUEUE``.
        """
        self.maybe_finalize()
        if preemption is not None and preemption.should_stop():
            self.save_for_preemption(iteration, branch_model, state, preemption)
            return True
        interval = self.ccfg.interval
        if interval > 0 and iteration % interval == 0:
            self.save(iteration, branch_model, state)
        return False

    def save_for_preemption(
        self,
        iteration: int,
        branch_model,
        state: EngineState,
        preemption: PreemptionHandler,
    ) -> bool:
        """Finish pending writes and save ``iteration`` synchronously if the grace period allows
        (collective). Returns True when ``iteration`` is on disk."""
        self.wait()
        if self.last_saved == iteration:
            return True
        estimate = self.last_save_seconds or 0.0
        # Margin for variance; the decision is agreed so that all branches stay at one iteration.
        too_late = self._any_true(preemption.time_left() < 1.25 * estimate)
        if too_late:
            self._info(
                f"preemption: not saving iteration {iteration}: a save takes ~{estimate:.1f}s, "
                f"{max(0.0, preemption.time_left()):.1f}s of the {preemption.grace_seconds:.0f}s "
                f"grace left; the job resumes from iteration {self.last_saved}", warn=True
            )
            return False
        self.save(iteration, branch_model, state, async_save=False)
        self._info(
            f"preemption: checkpoint of iteration {iteration} written "
            f"{preemption.elapsed():.1f}s after the signal"
        )
        return True

    # --------------------------------------------------------------------------------- load
    def load_latest(self, branch_model, *, strict: bool = True) -> Resumed | None:
        """Restore the newest iteration that is complete in every branch (collective over the
        sync group). None when no branch has a checkpoint. ``strict=False`` accepts a model
        config that differs from the checkpoint's (the load itself still needs equal shapes)."""
        scan = scan_branch_dir(self.branch_dir)
        report = scan.report()
        if report:
            self._info(report, warn=True)
        mine = (self.groups.branch, sorted(scan.complete), scan.latest)
        views: list[Any] = [None] * dist.get_world_size(self.sync_group)
        dist.all_gather_object(views, mine, group=self.sync_group)
        complete: dict[int, set[int]] = {}
        latest: dict[int, set] = {}
        for branch, iters, lat in views:
            # Ranks of one branch normally agree; if a file system view lags, intersect.
            complete[branch] = complete.get(branch, set(iters)) & set(iters)
            latest.setdefault(branch, set()).add(lat)
        if not any(complete.values()):
            return None
        common = set.intersection(*complete.values())
        if not common:
            listing = "; ".join(
                f"{self.groups.layout.names[b]}: {sorted(v) or 'none'}"
                for b, v in sorted(complete.items())
            )
            self._agree(
                f"{self.root}: no iteration has a complete checkpoint in every branch "
                f"({listing}); branches must resume together"
            )
        pointed = set().union(*latest.values())
        if len(pointed) == 1 and next(iter(pointed)) in common:
            chosen = next(iter(pointed))
        else:
            chosen = max(common)
            if scan.latest != chosen:
                why = scan.latest_problem or f"latest is {scan.latest}"
                self._info(f"resuming from iteration {chosen}, newest complete in every branch "
                           f"({why})", warn=True)
        newer = sorted(n for n in scan.complete if n > chosen)
        if newer:
            self._info(f"checkpoints newer than {chosen} will be replaced: {newer}", warn=True)
        return self.load(self.branch_dir / iter_name(chosen), branch_model, strict=strict)

    def load(self, ckpt_dir: str | os.PathLike, branch_model, *, strict: bool = True) -> Resumed:
        """Restore one checkpoint directory of this branch (collective over the sync group)."""
        ckpt_dir = Path(ckpt_dir)
        error = None
        with_rng = False
        try:
            meta = read_meta(ckpt_dir)
            self._check_meta(ckpt_dir, meta, branch_model, strict)
            verify_files(ckpt_dir)
            saved = meta.get("layout", {})
            layout = self.groups.layout
            with_rng = all(saved.get(k) == getattr(layout, k) for k in ("tp", "pp", "dp", "cp"))
        except CheckpointError as e:
            error = str(e)
        self._agree(error)
        restored = None
        try:
            sharded = build_train_state(branch_model, 0, None, for_loading=True, with_rng=with_rng)
            loaded = dist_checkpointing.load(
                sharded, str(ckpt_dir), process_group=self.groups.branch_group
            )
            restored = restore_train_state(branch_model, loaded, with_rng=with_rng)
        except CheckpointError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - any reader failure: one line naming the dir
            log.debug("loading %s failed", ckpt_dir, exc_info=True)
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            error = f"{ckpt_dir}: cannot load ({type(e).__name__}: {first})"
        self._agree(error)
        assert restored is not None
        if not with_rng:
            self._info(f"layout changed since {ckpt_dir.name}: RNG states re-seeded, not restored",
                       warn=True)
        self.last_saved = restored.iteration
        self._info(f"resumed from {ckpt_dir} (iteration {restored.iteration})")
        return Resumed(restored.iteration, restored.engine_state, ckpt_dir, restored.rng_restored)

    def _check_meta(self, ckpt_dir: Path, meta: dict, branch_model, strict: bool) -> None:
        meta_path = ckpt_dir / META_FILE
        if meta.get("format") != FORMAT:
            raise CheckpointError(
                f"{meta_path}: not a training checkpoint (format {meta.get('format')!r}); "
                f"a weights-only checkpoint is loaded as the base model (checkpoint.load)"
            )
        if meta.get("branch") != self.branch:
            raise CheckpointError(
                f"{meta_path}: checkpoint of branch {meta.get('branch')!r}, but this rank trains "
                f"branch {self.branch!r}"
            )
        if meta.get("branch") not in self.cfg.branch_names:
            raise CheckpointError(
                f"{meta_path}: branch {meta.get('branch')!r} is not in the config "
                f"(branches: {', '.join(self.cfg.branch_names)})"
            )
        if strict:
            diff = first_model_difference(meta.get("model", {}), to_dict(self.cfg.model))
            if diff:
                raise CheckpointError(
                    f"{meta_path}: saved for another model: {diff}"
                )
        fmt = optimizer_format(branch_model)
        if meta.get("optimizer_format") != fmt:
            raise CheckpointError(
                f"{meta_path}: optimizer state format is {meta.get('optimizer_format')!r}, this "
                f"run uses {fmt!r}; set parallel.distributed_optimizer to match the checkpoint"
            )


def retention_victims(
    iterations, newest: int, keep_last: int, keep_every: int
) -> list[int]:
    """Iterations to delete after ``newest`` was published: all up to ``newest`` except the last
    ``keep_last`` (<= 0 keeps all) and the multiples of ``keep_every`` (> 0)."""
    older = sorted(n for n in iterations if n <= newest)
    keep = set(older) if keep_last <= 0 else set(older[-keep_last:])
    if keep_every > 0:
        keep |= {n for n in older if n % keep_every == 0}
    keep.add(newest)
    return [n for n in older if n not in keep]


def first_model_difference(saved: dict, current: dict, prefix: str = "model") -> str | None:
    """The first architecture field that differs: ``model.hidden_size: checkpoint 64, config
    128``; None when the architectures match."""
    keys = list(current) + [k for k in saved if k not in current]
    for key in keys:
        dotted = f"{prefix}.{key}"
        if dotted.split(".", 1)[1] in _NOT_ARCHITECTURE:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if (a, b) in (("<absent>", None), (None, "<absent>")):  # a later section, unset: same
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            inner = first_model_difference(a, b, dotted)
            if inner:
                return inner
        elif a != b:
            return f"{dotted}: checkpoint {a!r}, config {b!r}"
    return None


def _remove_dir(path: Path) -> None:
    """Rename first, so that a crash mid-delete never leaves a half-deleted complete-looking
    checkpoint."""
    doomed = path.with_name(path.name + DELETING_SUFFIX)
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
