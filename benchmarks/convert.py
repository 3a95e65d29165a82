#!/usr/bin/env python
"""HF <-> torch_dist conversion time for a ~1 GB checkpoint, next to the time to simply read and
write the same bytes on the same disk (the physical limit), and the converters' peak memory.

    python benchmarks/convert.py [--gb 1.0] [--dtype fp32|bf16] [--family qwen3|qwen3_vl|qwen2_5_vl]
                                 [--workdir DIR] [--repeat 2]

A Qwen3-shaped model (QK-norm, GQA, untied head; ``--family qwen3_vl``: plus a Qwen3-VL vision
tower of 4 layers of Qwen3-VL-4B's width, DeepStack from 2 of them) is sized to about --gb of
weights and written as a sharded HF safetensors checkpoint with random values (no model is
built). Then, each step
in a fresh subprocess (so its peak RSS is its own):

- import:   HF safetensors -> torch_dist        (tools/import_from_hf.py's library call)
- export:   torch_dist -> HF safetensors        (tools/convert_to_hf.py's library call)
- limit:    read every input file + write the same number of bytes + fsync, the files copied
            in parallel by as many threads as the converters use

Memory is the peak RSS growth during the step (sampled every 5 ms, after imports). Figures are
printed per repeat; the page cache is warm after the first pass (the machine's RAM
holds everything), so the limit is the warm-cache copy speed unless --drop-caches works.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, {root!r})
import psutil
import torch
from megatron_copd.models.conversion import hf_export, hf_import  # noqa: F401 (before baseline)
from megatron_copd.checkpoint import torch_dist_io  # noqa: F401
step, a, b = sys.argv[1:4]
proc = psutil.Process()
base = proc.memory_info().rss
peak = [base]
done = threading.Event()

def sample():
    while not done.wait(0.005):
        peak[0] = max(peak[0], proc.memory_info().rss)

threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
if step == "import":
    from megatron_copd.models.conversion.hf_import import import_from_hf
    r = import_from_hf(a, b, workers=int(sys.argv[4]))
    n = r.bytes_written
elif step == "export":
    from megatron_copd.models.conversion.hf_export import convert_to_hf
    r = convert_to_hf(a, b, workers=int(sys.argv[4]), with_tokenizer=False)
    n = r.bytes_written
else:  # the physical limit: read all of a's files, write the same bytes into b, fsync;
    # files copied in parallel by as many threads as the converters use
    import os
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    os.makedirs(b)

    def copy(src):
        buf, n = bytearray(16 << 20), 0
        with open(src, "rb", buffering=0) as fi, open(Path(b) / src.name, "wb", buffering=0) as fo:
            while True:
                k = fi.readinto(buf)
                if not k:
                    break
                fo.write(memoryview(buf)[:k])
                n += k
            os.fsync(fo.fileno())
        return n

    files = sorted((p for p in Path(a).rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
    with ThreadPoolExecutor(int(sys.argv[4])) as pool:
        n = sum(pool.map(copy, files))
dt = time.perf_counter() - t0
done.set()
peak[0] = max(peak[0], proc.memory_info().rss)
print(json.dumps({{"seconds": dt, "bytes": n, "peak_rss_mb": (peak[0] - base) / 2**20}}))
"""


def make_hf_checkpoint(path: Path, target_bytes: float, dtype,
                       family: str = "qwen3") -> tuple[int, int]:
    """Write a Qwen3-shaped HF checkpoint of about ``target_bytes``; (params, bytes)."""
    import torch
    from safetensors.torch import save_file

    from megatron_copd.config import ModelConfig, QwenVLConfig
    from megatron_copd.model_size import qwen_vl_params
    from megatron_copd.models.conversion import families
    from megatron_copd.models.conversion.hf_config import SpecialTokens

    hidden, ffn, vocab, heads, groups = 1024, 3072, 32768, 16, 8
    vision, decoder = None, "qwen3"
    if family == "qwen3_vl":
        vision = QwenVLConfig(depth=4, hidden_size=1024, num_heads=16, intermediate_size=4096,
                              num_position_embeddings=2304, deepstack_visual_indexes=[1, 3],
                              mrope_section=[8, 12, 12])
    elif family == "qwen2_5_vl":  # Qwen2.5-VL-7B's tower width, 4 layers; a Qwen2 decoder
        vision = QwenVLConfig(version="qwen2_5_vl", depth=4, hidden_size=1280, num_heads=16,
                              intermediate_size=3420, patch_size=14, fullatt_block_indexes=[3],
                              mrope_section=[8, 12, 12], mrope_interleaved=False)
        decoder = "qwen2"
    per_layer = hidden * (heads + 2 * groups) * 64 + hidden * heads * 64 + 3 * hidden * ffn
    budget = target_bytes / dtype.itemsize - 2 * vocab * hidden
    budget -= qwen_vl_params(vision, hidden) if vision else 0
    layers = max(1, round(budget / per_layer))
    model = ModelConfig(family=decoder, vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                        num_attention_heads=heads, num_query_groups=groups, kv_channels=64,
                        ffn_hidden_size=ffn, tie_embeddings=False, qwen_vl=vision)
    path.mkdir(parents=True)
    maps = families.export_maps(model)
    gen = torch.Generator().manual_seed(0)
    shard, shard_bytes, files, weight_map, total, params = {}, 0, [], {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    for p in maps.params:
        for layer in range(p.layers) if p.layers else [None]:
            for name, shape in zip(p.hf_names(layer), p.hf_shapes()):
                t = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
                shard[name] = t
                shard_bytes += t.nbytes
                total += t.nbytes
                params += t.numel()
                if shard_bytes > 400 << 20:
                    flush()
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg = families.export_config(model, dtype, SpecialTokens(1, 2, 3))
    (path / "config.json").write_text(json.dumps(cfg))
    return params, total


def run_child(root: Path, step: str, a: Path, b: Path, workers: int) -> dict:
    code = CHILD.format(root=str(root))
    out = subprocess.run([sys.executable, "-c", code, step, str(a), str(b), str(workers)],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--family", choices=["qwen3", "qwen3_vl", "qwen2_5_vl"], default="qwen3")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--drop-caches", action="store_true",
                    help="drop the page cache before every step (needs root)")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    work = Path(tempfile.mkdtemp(prefix="convert-bench-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        params, total = make_hf_checkpoint(work / "hf", args.gb * 1e9, dtype, args.family)
        print(f"HF checkpoint ({args.family}): {params / 1e6:.0f}M params, {total / 1e9:.2f} GB {args.dtype} "
              f"(made in {time.perf_counter() - t0:.1f} s); {os.cpu_count()} CPUs; {work}")
        rows = []
        for rep in range(args.repeat):
            for d in ("mc", "hf_out", "copy_in", "copy_mc"):
                shutil.rmtree(work / d, ignore_errors=True)
            steps = [("import", work / "hf", work / "mc"),
                     ("limit: copy the HF files", work / "hf", work / "copy_in"),
                     ("export", work / "mc", work / "hf_out"),
                     ("limit: copy the torch_dist files", work / "mc", work / "copy_mc")]
            for label, a, b in steps:
                cold = args.drop_caches and drop_caches()
                kind = label.split(":")[0]
                r = run_child(root, "copy" if kind == "limit" else kind, a, b, args.workers)
                r.update(label=label, rep=rep, cold=cold)
                rows.append(r)
                print(f"[{rep}] {label:34s} {r['seconds']:6.2f} s  "
                      f"{r['bytes'] / r['seconds'] / 1e9:5.2f} GB/s  peak RSS growth "
                      f"{r['peak_rss_mb']:6.0f} MB{'  (cold cache)' if cold else ''}")
        def median(label: str) -> float:
            xs = sorted(r["seconds"] for r in rows if r["label"] == label)
            return xs[len(xs) // 2]

        imp, exp = median("import"), median("export")
        lim_in, lim_mc = median("limit: copy the HF files"), median("limit: copy the torch_dist files")
        print(f"summary (medians of {args.repeat}): import {imp:.2f} s = {imp / lim_in:.2f}x the "
              f"copy of the same bytes ({lim_in:.2f} s); export {exp:.2f} s = "
              f"{exp / lim_mc:.2f}x ({lim_mc:.2f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
