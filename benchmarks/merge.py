"""Checkpoint merge speed and memory, next to the disk's limit measured in the same run.

    PYTHONPATH=. python benchmarks/merge.py [--sizes-gb 1 4] [--k 2 3] [--dtype bf16]
        [--dir /tmp/copd_merge_bench] [--workers N] [--chunk-mb M] [--keep]

Inputs: synthetic torch_dist checkpoints written with TorchDistWriter in megatron's layout for
a Llama-shaped model (hidden 2048, ffn 5504, vocab 32000; layer-stacked [L, out, in] tensors; as
many layers as the size asks). Input k is stored as if saved at TP = 1, 2, 4 (a file per TP rank,
chunks cut along each tensor's TP axis), so the merge re-chunks across layouts. Random values.

For each size and K the script measures, alternating, in the same run on the same disk:
- limit: one plain sequential pass that reads every input file and writes one output file of the
  merged output's size (8 MiB blocks), then fsyncs it — what `cat inputs > out; sync` costs;
- merge: tools/merge_checkpoints.py in a subprocess: its own time for the merge (checks, stream,
  fsync, rename) and the process's wall time; peak RSS and peak anonymous RSS (the process's own
  memory, not mapped library files) polled every 5 ms from /proc; compare with the idle
  interpreter that imported the merger.
"warm": inputs in the page cache; "cold": inputs evicted first (posix_fadvise DONTNEED; this
machine does not allow drop_caches). Best of --repeat runs for each figure.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from megatron_copd.checkpoint.meta import make_meta
from megatron_copd.checkpoint.torch_dist_io import TorchDistWriter

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "merge_checkpoints.py"
H, F, V = 2048, 5504, 32000
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def model_layout(size_bytes: int, itemsize: int) -> dict[str, tuple[tuple[int, ...], int]]:
    """key -> (global shape, TP axis or -1)."""
    per_layer = (4 * H * H + 3 * F * H + 2 * H) * itemsize
    embed = 2 * V * H * itemsize
    layers = max(1, round((size_bytes - embed) / per_layer))
    return {
        "model.embedding.word_embeddings.weight": ((V, H), 0),
        "model.decoder.layers.self_attention.linear_qkv.weight": ((layers, 3 * H, H), 1),
        "model.decoder.layers.self_attention.linear_proj.weight": ((layers, H, H), 2),
        "model.decoder.layers.mlp.linear_fc1.weight": ((layers, 2 * F, H), 1),
        "model.decoder.layers.mlp.linear_fc2.weight": ((layers, H, F), 2),
        "model.decoder.layers.input_layernorm.weight": ((layers, H), -1),
        "model.decoder.layers.pre_mlp_layernorm.weight": ((layers, H), -1),
        "model.decoder.final_layernorm.weight": ((H,), -1),
        "model.output_layer.weight": ((V, H), 0),
    }


def write_input(path: Path, size: int, dtype: torch.dtype, tp: int, seed: int) -> int:
    """Chunks as megatron stores them at this TP: one per layer and TP rank (file per rank)."""
    gen = torch.Generator().manual_seed(seed)
    with TorchDistWriter(path, num_files=tp) as w:
        for key, (shape, axis) in model_layout(size, dtype.itemsize).items():
            w.declare_tensor(key, shape, dtype)
            stacked = len(shape) == 3 or (len(shape) == 2 and shape[0] != V and axis == -1)
            for layer in range(shape[0]) if stacked else [None]:
                inner = shape[1:] if stacked else shape
                ax = axis - 1 if (stacked and axis > 0) else axis
                parts = tp if ax >= 0 and inner[ax] % tp == 0 else 1
                for r in range(parts):
                    sizes = list(inner)
                    offs = [0] * len(inner)
                    if parts > 1:
                        sizes[ax] //= tp
                        offs[ax] = r * sizes[ax]
                    data = (torch.randn(sizes, generator=gen) * 0.02).to(dtype)
                    if stacked:
                        data, offs = data.unsqueeze(0), [layer] + offs
                    w.write_chunk(key, tuple(offs), data, file_index=r % tp)
        w.write_common_state({})
        w.meta = make_meta({"hidden_size": H, "ffn_hidden_size": F}, f"b{seed}", "sha256:bench")
        w.commit()
    return dir_bytes(path)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.name.endswith(".distcp"))


def evict(paths: list[Path]) -> None:
    for p in paths:
        for f in p.iterdir():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm(paths: list[Path]) -> None:
    for p in paths:
        for f in p.iterdir():
            with open(f, "rb", buffering=0) as fh:
                while fh.read(8 << 20):
                    pass


def limit_pass(inputs: list[Path], out_file: Path, out_bytes: int) -> float:
    """Read every input file sequentially and write out_bytes to one file, then fsync."""
    block = bytearray(8 << 20)
    view = memoryview(block)
    t0 = time.perf_counter()
    written = 0
    with open(out_file, "wb", buffering=0) as out:
        for p in inputs:
            for f in sorted(p.iterdir()):
                with open(f, "rb", buffering=0) as fh:
                    while n := fh.readinto(block):
                        if written < out_bytes:
                            take = min(n, out_bytes - written)
                            out.write(view[:take])
                            written += take
        while written < out_bytes:
            take = min(len(block), out_bytes - written)
            out.write(view[:take])
            written += take
        os.fsync(out.fileno())
    dt = time.perf_counter() - t0
    out_file.unlink()
    return dt


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_polled(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float, int, int]:
    """Run ``cmd`` (a python process), polling its anonymous RSS every 5 ms; returns the
    completed process, wall time, peak RssAnon and peak VmRSS (KiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    anon = rss = 0
    while proc.poll() is None:
        anon = max(anon, _status_kb(proc.pid, "RssAnon"))
        rss = max(rss, _status_kb(proc.pid, "VmRSS"))
        time.sleep(0.005)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), wall, anon, rss


def run_merge(inputs: list[Path], out: Path, args) -> dict:
    cmd = [
        sys.executable,
        str(TOOL),
        "--inputs",
        *map(str, inputs),
        "--output",
        str(out),
        "--no-progress",
    ]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    if args.chunk_mb:
        cmd += ["--chunk-mb", str(args.chunk_mb)]
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    shutil.rmtree(out, ignore_errors=True)
    proc, wall, anon, rss = run_polled(cmd, env)
    if proc.returncode != 0:
        raise SystemExit(f"merge failed:\n{proc.stdout}\n{proc.stderr}")
    inner = float(re.search(r"GB read in ([\d.]+) s", proc.stdout).group(1))
    return {
        "wall": wall,
        "merge": inner,
        "anon_mb": anon / 1024,
        "rss_mb": rss / 1024,
        "out_bytes": dir_bytes(out),
    }


def baseline_rss_mb() -> tuple[float, float]:
    """(RssAnon, VmRSS) of the same interpreter with the merger imported, idle."""
    code = "import time, megatron_copd.checkpoint.merge, tools.merge_checkpoints; time.sleep(1)"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    _, _, anon, rss = run_polled([sys.executable, "-c", code], env)
    return anon / 1024, rss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 4.0])
    ap.add_argument("--k", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--dir", default="/tmp/copd_merge_bench")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--chunk-mb", type=float, default=None)
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement (best kept)")
    ap.add_argument("--modes", nargs="+", default=["warm", "cold"], choices=["warm", "cold"])
    ap.add_argument("--keep", action="store_true", help="keep the inputs for the next run")
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    kmax = max(args.k)
    need = max(args.sizes_gb) * (kmax + 2) * 2**30
    free = shutil.disk_usage(root).free
    print(f"disk: {free / 2**30:.1f} GiB free under {root}, need about {need / 2**30:.1f} GiB")
    if free < need:
        raise SystemExit("not enough disk space")
    base_anon, base_rss = baseline_rss_mb()
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; dtype "
        f"{args.dtype}; idle interpreter with the merger imported: RSS {base_rss:.0f} MiB, "
        f"anonymous {base_anon:.0f} MiB"
    )
    dtype = DTYPES[args.dtype]
    header = (
        f"{'size':>6} {'K':>2} {'mode':>5} {'limit s':>8} {'merge s':>8} {'ratio':>6} "
        f"{'proc s':>7} {'GB/s in':>8} {'peak RSS':>9} {'peak anon':>9} (MiB)"
    )
    print(header)
    try:
        for size_gb in args.sizes_gb:
            size = int(size_gb * 2**30)
            inputs = []
            for k in range(kmax):
                path = root / f"in{size_gb:g}g_{args.dtype}_{k}"
                if not (path / ".metadata").exists():
                    write_input(path, size, dtype, tp=[1, 2, 4][k % 3], seed=k)
                inputs.append(path)
            out = root / "merged"
            for k in args.k:
                ins = inputs[:k]
                in_bytes = sum(dir_bytes(p) for p in ins)
                for mode in args.modes:
                    best_l = best_m = None
                    for _ in range(args.repeat):
                        (evict if mode == "cold" else warm)(ins)
                        t_limit = limit_pass(ins, root / "limit.bin", dir_bytes(ins[0]))
                        (evict if mode == "cold" else warm)(ins)
                        m = run_merge(ins, out, args)
                        best_l = t_limit if best_l is None else min(best_l, t_limit)
                        best_m = m if best_m is None or m["merge"] < best_m["merge"] else best_m
                    print(
                        f"{size_gb:>5g}G {k:>2} {mode:>5} {best_l:>8.2f} {best_m['merge']:>8.2f} "
                        f"{best_m['merge'] / best_l:>6.2f} {best_m['wall']:>7.2f} "
                        f"{in_bytes / best_m['merge'] / 1e9:>8.2f} {best_m['rss_mb']:>9.0f} "
                        f"{best_m['anon_mb']:>9.0f}",
                        flush=True,
                    )
            shutil.rmtree(out, ignore_errors=True)
            if not args.keep:
                for p in inputs:
                    shutil.rmtree(p, ignore_errors=True)
    finally:
        (root / "limit.bin").unlink(missing_ok=True)
        shutil.rmtree(root / "merged", ignore_errors=True)
        shutil.rmtree(root / "merged.tmp", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(
        "merge s: time inside merge_checkpoints (checks, fingerprint-free stream, fsync, "
        "rename); proc s: the whole subprocess incl. interpreter start; ratio = merge s / limit s"
    )


if __name__ == "__main__":
    main()
