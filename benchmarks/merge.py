"""Checkpoint merge speed and memory, next to the disk's limit measured in the same run.

    PYTHONPATH=. python benchmarks/merge.py [--sizes-gb 1 4] [--k 2 3] [--dtype bf16]
        [--dir /tmp/copd_merge_bench] [--workers N] [--chunk-mb M] [--keep]
        [--mergekit auto|off] [--mergekit-python PY]

Inputs: synthetic torch_dist checkpoints written with TorchDistWriter in this project's model
layout (keys and copd_meta.json model config of a Llama-shaped text model: hidden 2048, 16
heads, ffn 5504, vocab 32000, untied head; layer-stacked [L, out, in] tensors; as many layers as
the size asks). Input k is stored as if saved at TP = 1, 2, 4 (a file per TP rank, chunks cut
along each tensor's TP axis), so the merge re-chunks across layouts. Random values.

For each size and K the script measures, alternating, in the same run on the same disk:
- limit: one plain sequential pass that reads every input file and writes one output file of the
  merged output's size (8 MiB blocks), then fsyncs it — what `cat inputs > out; sync` costs;
- merge: tools/merge_checkpoints.py in a subprocess: its own time for the merge (checks, stream,
  fsync, rename) and the process's wall time; peak RSS and peak anonymous RSS (the process's own
  memory, not mapped library files) polled every 5 ms from /proc; compare with the idle
  interpreter that imported the merger.
- mergekit (optional: skipped with a note when PY cannot import mergekit; not a dependency of
  this project): the same inputs exported to HF safetensors with the project's converter
  (convert_to_hf, untimed, once per input), merged by mergekit's linear method (uniform weights,
  output in the inputs' dtype) in a subprocess of PY; its time is run_merge + fsync of the output
  (what the merger's own figure covers), and the process's wall time and peak memory as above.
"warm": inputs in the page cache; "cold": inputs evicted first (posix_fadvise DONTNEED; this
machine does not allow drop_caches). Best of --repeat runs for each figure, and the "paired"
ratio: the median over the repeats of each merge's time over the limit pass run just before it
(this machine's disk throughput drifts by 2-4x within minutes, so a best-vs-best ratio can pair a
lucky limit pass with an unlucky merge).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from megatron_copd.checkpoint.meta import make_meta
from megatron_copd.checkpoint.torch_dist_io import TorchDistWriter
from megatron_copd.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "merge_checkpoints.py"
H, F, V, HEADS = 2048, 5504, 32000, 16
LM = "model.language_model."
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def num_layers(size_bytes: int, itemsize: int) -> int:
    per_layer = (4 * H * H + 3 * F * H + 2 * H) * itemsize
    embed = 2 * V * H * itemsize
    return max(1, round((size_bytes - embed) / per_layer))


def model_config(layers: int) -> ModelConfig:
    """What the inputs' copd_meta.json records: lets convert_to_hf export them (Llama)."""
    return ModelConfig(family="llama", vocab_size=V, hidden_size=H, num_layers=layers,
                       num_attention_heads=HEADS, num_query_groups=HEADS, ffn_hidden_size=F,
                       tie_embeddings=False, max_sequence_length=4096)


def model_layout(layers: int) -> dict[str, tuple[tuple[int, ...], int]]:
    """key -> (global shape, TP axis or -1); the keys save_model writes for model_config()."""
    layer = LM + "decoder.layers."
    return {
        LM + "embedding.word_embeddings.weight": ((V, H), 0),
        layer + "self_attention.linear_qkv.layer_norm_weight": ((layers, H), -1),
        layer + "self_attention.linear_qkv.weight": ((layers, 3 * H, H), 1),
        layer + "self_attention.linear_proj.weight": ((layers, H, H), 2),
        layer + "mlp.linear_fc1.layer_norm_weight": ((layers, H), -1),
        layer + "mlp.linear_fc1.weight": ((layers, 2 * F, H), 1),
        layer + "mlp.linear_fc2.weight": ((layers, H, F), 2),
        LM + "decoder.final_layernorm.weight": ((H,), -1),
        LM + "output_layer.weight": ((V, H), 0),
    }


def write_input(path: Path, size: int, dtype: torch.dtype, tp: int, seed: int) -> int:
    """Chunks as megatron stores them at this TP: one per layer and TP rank (file per rank)."""
    gen = torch.Generator().manual_seed(seed)
    layers = num_layers(size, dtype.itemsize)
    with TorchDistWriter(path, num_files=tp) as w:
        for key, (shape, axis) in model_layout(layers).items():
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
        w.meta = make_meta(model_config(layers), f"b{seed}", "sha256:bench")
        w.commit()
    return dir_bytes(path)


def dir_bytes(path: Path) -> int:
    return sum(
        f.stat().st_size for f in path.iterdir() if f.name.endswith((".distcp", ".safetensors"))
    )


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


MERGEKIT_CHILD = r"""
import os, sys, time
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

config = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
out = sys.argv[2]
options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                       lazy_unpickle=True)
t0 = time.perf_counter()
run_merge(config, out, options)
for name in os.listdir(out):
    fd = os.open(os.path.join(out, name), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
print(f"mergekit merged in {time.perf_counter() - t0:.3f} s")
"""


def mergekit_available(python: str) -> str | None:
    """None if ``python`` can import mergekit, else why not."""
    try:
        proc = subprocess.run(
            [python, "-c", "import mergekit.merge, yaml"], check=False, capture_output=True,
            text=True,
        )
    except OSError as e:
        return str(e)
    return None if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1]


def export_hf(src: Path, dst: Path) -> Path:
    """The input as HF safetensors, through the project's converter (once; kept with --keep)."""
    from megatron_copd.models.conversion.hf_export import convert_to_hf

    if not (dst / "config.json").exists():
        shutil.rmtree(dst, ignore_errors=True)
        convert_to_hf(src, dst, with_tokenizer=False)
    return dst


def run_mergekit(hf_inputs: list[Path], out: Path, python: str, dtype: str) -> dict:
    config = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in hf_inputs],
        "parameters": {"normalize": True},
        "dtype": "float32",  # accumulate in fp32 like the merger
        "out_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype],
    }
    cfg_file = out.with_name("mergekit.yaml")
    cfg_file.write_text(json.dumps(config))  # JSON is YAML
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    cmd = [python, "-c", MERGEKIT_CHILD, str(cfg_file), str(out)]
    proc, wall, anon, rss = run_polled(cmd, env)
    if proc.returncode != 0:
        raise SystemExit(f"mergekit failed:\n{proc.stdout}\n{proc.stderr}")
    inner = float(re.search(r"mergekit merged in ([\d.]+) s", proc.stdout).group(1))
    result = {
        "wall": wall,
        "merge": inner,
        "anon_mb": anon / 1024,
        "rss_mb": rss / 1024,
        "out_bytes": dir_bytes(out),
    }
    check_average(hf_inputs, out, "model.layers.0.mlp.down_proj.weight")
    shutil.rmtree(out, ignore_errors=True)
    return result


def _hf_tensor(d: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            if name in h.keys():  # noqa: SIM118 (safe_open has no __contains__)
                return h.get_tensor(name)
    raise SystemExit(f"{d}: no tensor {name}")


def check_average(hf_inputs: list[Path], out: Path, name: str) -> None:
    """mergekit must have done the same work: its tensor is the fp32 mean, rounded once."""
    want = torch.stack([_hf_tensor(p, name).float() for p in hf_inputs]).mean(0)
    got = _hf_tensor(out, name)
    if not torch.allclose(got.float(), want, rtol=2**-7, atol=1e-7):
        diff = (got.float() - want).abs().max().item()
        raise SystemExit(f"mergekit's {name} is not the average of the inputs ({diff:.2e} off)")


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
    ap.add_argument("--mergekit", choices=["auto", "off"], default="auto",
                    help="auto: also time mergekit's linear merge when PY can import mergekit")
    ap.add_argument("--mergekit-python", default=sys.executable, metavar="PY",
                    help="interpreter with mergekit installed (default: this one)")
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    kmax = max(args.k)
    use_mk = args.mergekit == "auto"
    if use_mk and (why := mergekit_available(args.mergekit_python)):
        print(f"note: mergekit skipped ({args.mergekit_python} cannot import it: {why}); "
              f"pip install mergekit, or pass --mergekit-python")
        use_mk = False
    # inputs (+ their HF exports) + merged output + limit file (+ mergekit's output)
    need = max(args.sizes_gb) * ((2 if use_mk else 1) * kmax + (3 if use_mk else 2)) * 2**30
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
        f"{'size':>6} {'K':>2} {'mode':>5} {'tool':>8} {'limit s':>8} {'merge s':>8} "
        f"{'ratio':>6} {'paired':>6} {'proc s':>7} {'GB/s in':>8} {'peak RSS':>9} "
        f"{'peak anon':>9} (MiB)"
    )
    print(header)
    try:
        for size_gb in args.sizes_gb:
            size = int(size_gb * 2**30)
            inputs, hf_inputs = [], []
            for k in range(kmax):
                path = root / f"in{size_gb:g}g_{args.dtype}_{k}_lm"
                if not (path / ".metadata").exists():
                    write_input(path, size, dtype, tp=[1, 2, 4][k % 3], seed=k)
                inputs.append(path)
                if use_mk:
                    hf_inputs.append(export_hf(path, path.with_name(path.name + "_hf")))
            out = root / "merged"
            for k in args.k:
                ins = inputs[:k]
                in_bytes = sum(dir_bytes(p) for p in ins)
                for mode in args.modes:
                    prep = evict if mode == "cold" else warm
                    best_l = None
                    best: dict[str, dict] = {}
                    paired: dict[str, list[float]] = {}
                    for _ in range(args.repeat):
                        prep(ins)
                        t_limit = limit_pass(ins, root / "limit.bin", dir_bytes(ins[0]))
                        best_l = t_limit if best_l is None else min(best_l, t_limit)
                        prep(ins)
                        runs = {"ours": run_merge(ins, out, args)}
                        if use_mk:
                            prep(hf_inputs[:k])
                            runs["mergekit"] = run_mergekit(
                                hf_inputs[:k], root / "mergekit_out", args.mergekit_python,
                                args.dtype,
                            )
                        for tool, m in runs.items():
                            paired.setdefault(tool, []).append(m["merge"] / t_limit)
                            if tool not in best or m["merge"] < best[tool]["merge"]:
                                best[tool] = m
                    for tool, m in best.items():
                        print(
                            f"{size_gb:>5g}G {k:>2} {mode:>5} {tool:>8} {best_l:>8.2f} "
                            f"{m['merge']:>8.2f} {m['merge'] / best_l:>6.2f} "
                            f"{statistics.median(paired[tool]):>6.2f} {m['wall']:>7.2f} "
                            f"{in_bytes / m['merge'] / 1e9:>8.2f} {m['rss_mb']:>9.0f} "
                            f"{m['anon_mb']:>9.0f}",
                            flush=True,
                        )
            shutil.rmtree(out, ignore_errors=True)
            if not args.keep:
                for p in inputs + hf_inputs:
                    shutil.rmtree(p, ignore_errors=True)
    finally:
        (root / "limit.bin").unlink(missing_ok=True)
        (root / "mergekit.yaml").unlink(missing_ok=True)
        for name in ("merged", "merged.tmp", "mergekit_out"):
            shutil.rmtree(root / name, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(
        "merge s: time inside merge_checkpoints (checks, fingerprint-free stream, fsync, "
        "rename), for mergekit run_merge + fsync; proc s: the whole subprocess incl. "
        "interpreter start and imports; ratio = best merge s / best limit s; paired = median "
        "over the repeats of merge / the limit pass run just before it (cancels the disk's "
        "drift); GB/s in: bytes of the torch_dist inputs / merge s"
    )


if __name__ == "__main__":
    main()
