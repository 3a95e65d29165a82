"""torch_dist reader/writer without a model: round trips checked by torch DCP's own loader,
region reads across chunk layouts, the torch.load fallback, fingerprints, and bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from ckpt_helpers import synthetic_meta, write_synthetic
from torch.distributed.checkpoint import FileSystemReader

from megatron_copd.checkpoint import regions
from megatron_copd.checkpoint.chunk_locator import locate_chunk
from megatron_copd.checkpoint.fingerprint import compute_fingerprint
from megatron_copd.checkpoint.torch_dist_io import TorchDistReader, TorchDistWriter
from megatron_copd.errors import CheckpointError


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.stack": torch.randn(4, 10, 6, generator=g),
        "model.half": torch.randn(11, 5, generator=g).to(torch.bfloat16),
        "model.vec": torch.randn(13, generator=g),
        "model.scalar": torch.tensor(3.5),
        "model.count": torch.arange(7, dtype=torch.int64),
    }


def dcp_load(path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Torch DCP's own loader: the independent reference for everything written here."""
    out = {k: torch.empty_like(v) for k, v in like.items()}
    dcp.load(out, storage_reader=FileSystemReader(str(path)), no_dist=True)
    return out


def test_writer_output_loads_with_dcp_and_reader_reads_regions(tmp_path):
    tensors = _tensors()
    path = write_synthetic(
        tmp_path / "ck", tensors, objects={"model.x._extra_state/shard_0_1": None}
    )
    loaded = dcp_load(path, tensors)
    for key, t in tensors.items():
        assert torch.equal(loaded[key], t), key
    with TorchDistReader(path) as r:
        assert set(r.tensor_keys()) == set(tensors)
        assert r.info("model.half").dtype == torch.bfloat16
        assert len(r.info("model.stack").chunks) == 2  # 3-row chunks of 4 layers
        for key, t in tensors.items():
            assert torch.equal(r.read(key), t), key
        gen = torch.Generator().manual_seed(1)
        for _ in range(40):  # random boxes, crossing chunk boundaries
            t = tensors["model.stack"]
            offs = tuple(int(torch.randint(0, s, (1,), generator=gen)) for s in t.shape)
            sizes = tuple(
                int(torch.randint(1, s - o + 1, (1,), generator=gen)) for s, o in zip(t.shape, offs)
            )
            want = t[tuple(slice(o, o + s) for o, s in zip(offs, sizes))]
            assert torch.equal(r.read("model.stack", offs, sizes), want)
        assert r.read_object("model.x._extra_state/shard_0_1") == [None]
        assert r.read_object("common_state/shard_0_1") == [{}]
        with pytest.raises(CheckpointError, match="outside shape"):
            r.read("model.vec", (10,), (5,))


def test_region_reads_across_column_split_chunks(tmp_path):
    """Chunks cut along a trailing dim (as TP row-parallel layers store them)."""
    t = torch.randn(6, 8, 10)
    with TorchDistWriter(tmp_path / "ck", num_files=3) as w:
        w.declare_tensor("model.w", tuple(t.shape), t.dtype)
        for i, c0 in enumerate(range(0, 10, 4)):  # uneven column chunks 4, 4, 2
            w.write_chunk("model.w", (0, 0, c0), t[:, :, c0 : c0 + 4].clone(), i)
        w.write_common_state({})
        w.meta = synthetic_meta("x", None)
        w.commit()
    with TorchDistReader(tmp_path / "ck") as r:
        assert torch.equal(r.read("model.w"), t)
        assert torch.equal(r.read("model.w", (1, 2, 3), (3, 5, 6)), t[1:4, 2:7, 3:9])
        # the merger's row boxes meet every chunk in one contiguous run
        for offs, sizes in regions.split_rows(t.shape, 4, 100):
            parts = list(r.iter_region("model.w", offs, sizes))
            assert sum(p.numel() for _, p in parts) == regions.numel(sizes)


def test_non_contiguous_chunks_fall_back_to_torch_load(tmp_path):
    """A checkpoint written by torch DCP itself, holding a transposed (non-contiguous) view."""
    base = torch.randn(5, 7)
    path = tmp_path / "dcp"
    dcp.save({"model.t": base.t()}, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    with TorchDistReader(path) as r:
        chunk = r.info("model.t").chunks[0]
        fd = os.open(path / chunk.file, os.O_RDONLY)
        try:
            assert locate_chunk(fd, chunk.offset, chunk.length) is None
        finally:
            os.close(fd)
        assert torch.equal(r.read("model.t"), base.t())
        assert torch.equal(r.read("model.t", (2, 1), (3, 2)), base.t()[2:5, 1:3])


def test_fingerprint_ignores_layout_and_sees_weights(tmp_path):
    tensors = _tensors()
    a = write_synthetic(tmp_path / "a", tensors, chunk_rows=3)
    b = write_synthetic(tmp_path / "b", tensors, chunk_rows=2, num_files=3)
    assert compute_fingerprint(a) == compute_fingerprint(b)
    changed = dict(tensors, **{"model.stack": tensors["model.stack"].clone()})
    changed["model.stack"][2, 5, 3] += 1.0  # sampled: the middle of the middle row
    c = write_synthetic(tmp_path / "c", changed)
    assert compute_fingerprint(c) != compute_fingerprint(a)
    assert compute_fingerprint(a).startswith("sha256:")


def test_writer_never_publishes_partial_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with TorchDistWriter(out) as w:
            w.declare_tensor("model.w", (4,), torch.float32)
            w.write_chunk("model.w", (0,), torch.ones(2))
            raise RuntimeError("boom")
    assert not out.exists() and not (tmp_path / "out.tmp").exists()
    with TorchDistWriter(out) as w:  # leaving without commit() discards too
        w.declare_tensor("model.w", (4,), torch.float32)
        w.write_chunk("model.w", (0,), torch.ones(2))
        with pytest.raises(CheckpointError, match="incomplete"):
            w.commit()
    assert not out.exists() and not (tmp_path / "out.tmp").exists()


def test_writer_overwrite_replaces_and_refuses_without(tmp_path):
    old = write_synthetic(tmp_path / "ck", {"model.a": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="already exists"):
        TorchDistWriter(old)
    new = {"model.b": torch.ones(5)}
    with TorchDistWriter(old, overwrite=True) as w:
        w.declare_tensor("model.b", (5,), torch.float32)
        w.write_chunk("model.b", (0,), new["model.b"])
        w.write_common_state({})
        w.commit()
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    with TorchDistReader(old) as r:
        assert r.tensor_keys() == ["model.b"]


def test_writer_stores_views_compactly(tmp_path):
    big = torch.arange(1000, dtype=torch.float32)
    with TorchDistWriter(tmp_path / "ck") as w:
        w.declare_tensor("model.v", (10,), torch.float32)
        w.write_chunk("model.v", (0,), big[100:110])  # a view into a 4 KB storage
        w.write_common_state({})
        w.commit()
    with TorchDistReader(tmp_path / "ck") as r:
        assert torch.equal(r.read("model.v"), big[100:110])
        assert r.info("model.v").chunks[0].length < 2000


@pytest.mark.parametrize(
    "damage,message",
    [
        ("delete_shard", "missing shard __1_0.distcp"),
        ("truncate_shard", "truncated shard"),
        ("garbage_metadata", "corrupted metadata"),
        ("no_metadata", r"incomplete checkpoint \(no .metadata\)"),
        ("no_marker", r"not a torch_dist checkpoint \(no metadata.json\)"),
        ("no_dir", "no such checkpoint directory"),
    ],
)
def test_reader_refuses_damaged_checkpoints(tmp_path, damage, message):
    path = write_synthetic(tmp_path / "ck", _tensors())
    if damage == "delete_shard":
        (path / "__1_0.distcp").unlink()
    elif damage == "truncate_shard":
        f = path / "__0_0.distcp"
        os.truncate(f, f.stat().st_size - 100)
    elif damage == "garbage_metadata":
        (path / ".metadata").write_bytes(b"\x80\x04not a pickle")
    elif damage == "no_metadata":
        (path / ".metadata").unlink()
    elif damage == "no_marker":
        (path / "metadata.json").unlink()
    else:
        shutil.rmtree(path)
    with pytest.raises(CheckpointError, match=message) as e:
        TorchDistReader(path)
    assert "\n" not in str(e.value)


def test_meta_errors(tmp_path):
    path = write_synthetic(tmp_path / "ck", _tensors())
    (path / "copd_meta.json").unlink()
    with TorchDistReader(path) as r, pytest.raises(CheckpointError, match="no copd_meta.json"):
        r.meta
    (path / "copd_meta.json").write_text("{oops")
    with TorchDistReader(path) as r, pytest.raises(CheckpointError, match="corrupted metadata"):
        r.meta
