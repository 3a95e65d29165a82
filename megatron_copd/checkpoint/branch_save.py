"""Group-local torch_dist save: one branch writes its checkpoint while other branches write theirs.

``megatron.core.dist_checkpointing.save`` plans and validates over the whole world (it has no
process-group argument), so two branches saving into two directories at once either fail or
write each other's shards. This module rebuilds the same save from megatron's lower-level pieces
with every collective restricted to one process group:

1. preprocess (factories, non-persistent entries, common state) - as megatron's
   ``save_preprocess`` - and validate the sharding over the group only;
2. translate to torch DCP (``_replace_state_dict_keys_with_sharded_keys``,
   ``mcore_to_pyt_state_dict``) and plan with ``save_state_dict_async_plan(process_group=group,
   coordinator_rank=0)`` (one gather to the group's first rank);
3. write this rank's buckets with megatron's ``FileSystemWriterAsync`` writer function, either
   inline or in a background thread over a snapshot of the tensors;
4. finalize (:meth:`SaveRequest.finalize`, collective over the group): gather the write results,
   the coordinator writes ``.metadata`` and ``metadata.json``, and the outcome is broadcast from
   the coordinator's *global* rank (megatron's ``save_state_dict_async_finalize`` passes the
   group-local rank as a global ``src``, which is wrong for every group but the first).

The result is an ordinary torch_dist checkpoint: ``dist_checkpointing.load(...,
process_group=group)`` reads it at any TP/PP.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    apply_factories,
)
from megatron.core.dist_checkpointing.state_dict_utils import filter_out_empty_flatten_tensor
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from megatron.core.dist_checkpointing.strategies.state_dict_saver import (
    save_state_dict_async_plan,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from megatron.core.dist_checkpointing.utils import extract_nonpersistent, extract_sharded_base
from megatron.core.dist_checkpointing.validation import (
    _validate_objects_for_key,
    _validate_sharding_for_key,
    determine_global_metadata,
)
from torch.distributed.checkpoint.utils import _get_failure_dict

from megatron_copd.errors import CheckpointError

BACKEND = "torch_dist"
BACKEND_VERSION = 1


class _ThreadQueueWriter(FileSystemWriterAsync):
    """megatron's async writer, with the write results returned through a per-save thread queue.

    megatron's default is one process-wide ``multiprocessing.Manager().Queue()``, which starts a
    'spawn' helper process (it re-imports ``__main__``) and is shared by every save in the
    process. Our writes run in threads of this process, so a plain queue is enough.
    """

    def prepare_write_data(self, plan, planner) -> None:
        original = filesystem_async.get_write_results_queue
        filesystem_async.get_write_results_queue = lambda *args, **kwargs: queue.Queue()
        try:
            super().prepare_write_data(plan, planner)
        finally:
            filesystem_async.get_write_results_queue = original


def _group_rank(group) -> int:
    return dist.get_rank(group)


def _coordinator_global_rank(group) -> int:
    return dist.get_global_rank(group, 0) if group is not None else 0


def validate_sharding(sharded_part: dict, group) -> None:
    """megatron's sharding-integrity check (every shard written exactly once), over ``group``."""
    _, global_metadata = determine_global_metadata(sharded_part, process_group=group)
    verdict: list[str | None] = [None]
    if _group_rank(group) == 0:
        by_key = defaultdict(list)
        for rank, shardings in enumerate(global_metadata):
            for sharding in shardings:
                by_key[sharding.key].append((rank, sharding))
        errors = []
        for shardings in by_key.values():
            if isinstance(shardings[0][1], ShardedObject):
                errors.extend(_validate_objects_for_key(shardings))
            else:
                errors.extend(_validate_sharding_for_key(shardings))
        if errors:
            verdict[0] = "; ".join(str(e) for e in errors)[:2000]
    dist.broadcast_object_list(verdict, src=_coordinator_global_rank(group), group=group)
    if verdict[0]:
        raise RuntimeError(f"invalid sharding pattern for a group-local save: {verdict[0]}")


def _snapshot(write_buckets: list, live_storages: set[int] | None) -> list:
    """Own copies of the tensors to write (host memory), so training may change the originals.

    Device tensors are always copied to the host (the writer only writes CPU tensors). Host
    tensors are copied only for a background write (``live_storages`` given), and only when they
    still share storage with the live state (megatron's writer already cloned the views).
    """
    out = []
    for path, storage_key, (bytes_data, tensor_data) in write_buckets:
        tensors = []
        for item, tensor in tensor_data:
            if tensor.device.type != "cpu":
                tensor = tensor.detach().to("cpu")
            elif live_storages is not None and _storage(tensor) in live_storages:
                tensor = tensor.detach().clone()
            tensors.append((item, tensor))
        out.append((path, storage_key, (bytes_data, tensors)))
    return out


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


class SaveRequest:
    """One rank's part of a group-local save. :meth:`finalize` completes it (collective)."""

    def __init__(self, directory: Path, group, writer, plan_result, save_fn, save_args,
                 background: bool) -> None:
        self.directory = directory
        self.group = group
        self._writer = writer
        self._global_metadata = plan_result[1]
        self._dist_wrapper = plan_result[2]
        self._save_fn = save_fn
        self._save_args = save_args
        self._thread: threading.Thread | None = None
        self.is_background = background and save_fn is not None
        self.started = time.perf_counter()
        self.write_seconds: float | None = None
        self.finalized = False
        if save_fn is None:
            self.write_seconds = 0.0
        elif background:
            self._thread = threading.Thread(
                target=self._write, name=f"ckpt-write:{directory.name}", daemon=True
            )
            self._thread.start()
        else:
            self._write()

    def _write(self) -> None:
        t0 = time.perf_counter()
        self._save_fn(*self._save_args)
        self.write_seconds = time.perf_counter() - t0

    def written_locally(self) -> bool:
        """This rank's files are on disk (no collective)."""
        return self._thread is None or not self._thread.is_alive()

    def wait_locally(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def finalize(self) -> None:
        """Collective over the group: write ``.metadata`` + ``metadata.json`` once every rank's
        shards are written; raise on every rank if any rank failed."""
        if self.finalized:
            return
        self.wait_locally()
        write_results = self._writer.retrieve_write_results()
        all_results = self._dist_wrapper.gather_object(write_results)
        failure = ""
        if self._dist_wrapper.is_coordinator:
            failures = _get_failure_dict(all_results)
            if failures:
                rank, exc = next(iter(failures.items()))
                failure = f"rank {rank}: {type(exc).__name__}: {exc}"
            else:
                try:
                    self._writer.finish(self._global_metadata, all_results)
                    save_config(CheckpointingConfig(BACKEND, BACKEND_VERSION), str(self.directory))
                except OSError as e:
                    failure = f"writing .metadata: {e}"
        verdict = [failure]
        dist.broadcast_object_list(
            verdict, src=_coordinator_global_rank(self.group), group=self.group
        )
        self.finalized = True
        if verdict[0]:
            raise CheckpointError(f"{self.directory}: checkpoint write failed ({verdict[0]})")


def save_sharded(
    sharded_state_dict: dict,
    directory: str | Path,
    group,
    *,
    background: bool = False,
    validate: bool = True,
    thread_count: int = 1,
) -> SaveRequest:
    """Start saving a megatron sharded state dict into ``directory``, collectively over ``group``.

    Every rank of ``group`` (and only those) must call this with its part of the state. Planning
    happens now; the shard files are written now (``background=False``) or by a thread over a
    snapshot of the tensors (``background=True``, training may go on). The checkpoint is only
    readable after :meth:`SaveRequest.finalize`, which every rank of the group must call.
    ``directory`` must exist and be empty.
    """
    directory = Path(directory)
    apply_factories(sharded_state_dict)
    _, sharded_state_dict = extract_nonpersistent(sharded_state_dict)
    sharded_part, common = extract_sharded_base(sharded_state_dict)
    sharded_part = filter_out_empty_flatten_tensor(sharded_part)
    # Written once, by the group's first rank (replica 0), like megatron's "common_state".
    sharded_part["common_state"] = ShardedObject(
        key="common_state", data=common, global_shape=(1,), global_offset=(0,),
        replica_id=_group_rank(group),
    )
    if validate:
        validate_sharding(sharded_part, group)

    live = None
    if background:
        live = {_storage(sh.data) for sh in nested_values(sharded_part)
                if isinstance(sh, ShardedTensor) and sh.data is not None}
    flat, _, _ = _replace_state_dict_keys_with_sharded_keys(
        sharded_part, keep_only_main_replica=True
    )
    pyt_state_dict = mcore_to_pyt_state_dict(flat, False)
    writer = _ThreadQueueWriter(str(directory), thread_count=thread_count)
    plan_result = save_state_dict_async_plan(
        pyt_state_dict,
        writer,
        group,
        0,
        planner=MCoreSavePlanner(
            dedup_replicated_tensors=False, flatten_state_dict=False, flatten_sharded_tensors=False
        ),
    )[0]
    save_fn, _, save_args = writer.get_save_function_and_args()
    if save_fn is not None:
        save_args = list(save_args)
        save_args[1] = _snapshot(save_args[1], live)
    return SaveRequest(directory, group, writer, plan_result, save_fn, save_args, background)


def save_sharded_sync(sharded_state_dict: dict, directory: str | Path, group, **kwargs) -> None:
    """:func:`save_sharded` + finalize: returns when the checkpoint is complete on disk."""
    save_sharded(sharded_state_dict, directory, group, background=False, **kwargs).finalize()

