"""The checkpoint merger: arithmetic checked against torch DCP's own loader, inputs saved at
TP=1 / TP=2 / PP=2, the merged model loading at every layout, every refusal, and interruptions
that never leave an output behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ckpt_helpers import synthetic_meta, world_worker, write_synthetic
from harness import run_world
from test_torch_dist_io import dcp_load

from megatron_copd.checkpoint.merge import merge_checkpoints
from megatron_copd.checkpoint.torch_dist_io import TorchDistReader
from megatron_copd.errors import CheckpointError, UserError

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "merge_checkpoints.py"
BRANCHES = [("a", "tp1", 0.01), ("b", "tp2", -0.02), ("c", "pp2", 0.03)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """base (TP=1), branches a (TP=1), b (TP=2), c (PP=2) of the project's VLM, their merge,
    and the merge loaded and saved again at TP=1, TP=2 and PP=2 (see world_worker)."""
    root = tmp_path_factory.mktemp("real")
    results = run_world(world_worker, 2, args=(str(root), BRANCHES, ["tp1", "tp2", "pp2"]))
    return root, results


@pytest.fixture(scope="module")
def real(world):
    return world[0]


def _all_tensors(path) -> dict[str, torch.Tensor]:
    with TorchDistReader(path) as r:  # only for names/shapes; values come from DCP
        like = {k: torch.empty(r.info(k).shape, dtype=r.info(k).dtype) for k in r.tensor_keys()}
    return dcp_load(path, like)


def fp32_combination(xs: list[torch.Tensor], cs: list[float]) -> torch.Tensor:
    """sum_k c_k x_k accumulated in fp32, term by term: the merge's definition."""
    acc = torch.mul(xs[0].float(), cs[0])
    for x, c in zip(xs[1:], cs[1:]):
        acc.add_(x.float(), alpha=c)
    return acc


def assert_merged(merged: torch.Tensor, xs: list[torch.Tensor], cs: list[float], key: str):
    """``merged`` is the fp32 combination rounded to its dtype, to within one rounding step of
    that dtype, and (a sanity bound in float64) a true weighted sum of the inputs."""
    ref = fp32_combination(xs, cs).to(merged.dtype)
    step = (torch.nextafter(ref, torch.full_like(ref, float("inf"))) - ref).abs()
    err = (merged - ref).abs()
    assert bool((err <= step).all()), f"{key}: off by {err.max()} (> one step)"
    exact = sum(c * x.double() for c, x in zip(cs, xs))
    scale = sum(abs(c) * x.double().abs() for c, x in zip(cs, xs))
    bound = 4 * torch.finfo(merged.dtype).eps * scale + torch.finfo(merged.dtype).tiny
    assert bool(((merged.double() - exact).abs() <= bound).all()), key


def test_average_of_inputs_saved_at_different_layouts(real, tmp_path):
    a, b, c = (real / n for n, _, _ in BRANCHES)
    weights = [1.0, 2.0, 1.0]
    stats = merge_checkpoints([a, b, c], tmp_path / "m", weights=weights, workers=3, chunk_mb=0.01)
    assert stats.pieces > stats.tensors  # small pieces: every tensor is split
    ins = [_all_tensors(p) for p in (a, b, c)]
    merged = _all_tensors(tmp_path / "m")
    assert set(merged) == set(ins[0]) and all(k.startswith("model.") for k in merged)
    for key, m in merged.items():
        assert m.dtype == ins[0][key].dtype
        assert_merged(m, [x[key] for x in ins], [0.25, 0.5, 0.25], key)
    meta = TorchDistReader(tmp_path / "m").meta
    assert meta["branch"] == "merged" and meta["merge"]["coefficients"] == [0.25, 0.5, 0.25]
    assert meta["base_fingerprint"] == TorchDistReader(a).meta["base_fingerprint"]
    assert meta["model"] == TorchDistReader(a).meta["model"]

    merge_checkpoints([a, b], tmp_path / "bf16", dtype="bf16")
    half = _all_tensors(tmp_path / "bf16")
    for key, m in half.items():
        assert m.dtype == torch.bfloat16
        assert_merged(m, [ins[0][key], ins[1][key]], [0.5, 0.5], key)


def test_task_arithmetic(real, tmp_path):
    a, c = real / "a", real / "c"
    merge_checkpoints(
        [a, c], tmp_path / "ta", method="task_arithmetic", base=real / "base", weights=[0.7, 0.6]
    )
    base, x, y = (_all_tensors(p) for p in (real / "base", a, c))
    merged = _all_tensors(tmp_path / "ta")
    for key, m in merged.items():
        b = base[key].double()
        ref = (b + 0.7 * (x[key].double() - b) + 0.6 * (y[key].double() - b)).float()
        torch.testing.assert_close(m, ref, rtol=4e-7, atol=4e-7, msg=key)
    with pytest.raises(UserError, match="--base: task_arithmetic needs"):
        merge_checkpoints([a, c], tmp_path / "nobase", method="task_arithmetic")
    with pytest.raises(CheckpointError, match="--base has fingerprint"):
        merge_checkpoints([a, c], tmp_path / "wrongbase", method="task_arithmetic", base=a)


def test_merged_checkpoint_loads_at_tp1_tp2_pp2(world):
    root, results = world
    fingerprint, logits = results[0]
    assert TorchDistReader(root / "merged").meta["base_fingerprint"] == fingerprint
    torch.testing.assert_close(logits["tp1"], logits["tp2"], rtol=1e-5, atol=1e-5)
    # What megatron loaded into the model, saved again at each layout, is the merged checkpoint.
    want = _all_tensors(root / "merged")
    ins = [_all_tensors(root / n) for n, _, _ in BRANCHES]
    for key, m in want.items():
        assert_merged(m, [x[key] for x in ins], [1 / 3] * 3, key)
    for layout in ("tp1", "tp2", "pp2"):
        got = _all_tensors(root / f"resaved_{layout}")
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(got[key], want[key]), (layout, key)


# -- refusals (synthetic checkpoints) ---------------------------------------------------------


def _ck(tmp_path, name, *, seed=0, fp="sha256:base", shape=(6, 4), extra=None, model=None, **kw):
    g = torch.Generator().manual_seed(seed)
    tensors = {"model.w": torch.randn(shape, generator=g), "model.b": torch.randn(3, generator=g)}
    tensors.update(extra or {})
    meta = synthetic_meta(name, fp, **(model or {}))
    return write_synthetic(tmp_path / name, tensors, meta=meta, **kw)


def _cli(*args: str) -> tuple[int, str]:
    """Run the tool in-process; returns (exit code, stderr)."""
    import contextlib
    import io

    sys.path.insert(0, str(TOOL.parent))
    try:
        import merge_checkpoints as tool
    finally:
        sys.path.pop(0)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = tool.main([*args, "--no-progress"])
    return code, err.getvalue()


def _refused(code_err: tuple[int, str], pattern: str) -> None:
    import re

    code, err = code_err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("merge_checkpoints: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def test_refusals(tmp_path):
    a, b = _ck(tmp_path, "a", seed=1), _ck(tmp_path, "b", seed=2)
    out = str(tmp_path / "out")
    A, B = str(a), str(b)
    _refused(
        _cli(
            "--inputs",
            A,
            str(_ck(tmp_path, "k", extra={"model.z": torch.ones(2)})),
            "--output",
            out,
        ),
        r"k: key 'model.z' is not in .*/a",
    )
    _refused(
        _cli(
            "--inputs",
            str(_ck(tmp_path, "k2", extra={"model.z": torch.ones(2)})),
            A,
            "--output",
            out,
        ),
        r"/a: key 'model.z' is missing \(present in .*/k2\)",
    )
    _refused(
        _cli("--inputs", A, str(_ck(tmp_path, "s", shape=(6, 5))), "--output", out),
        r"'model.w' has shape \[6, 5\], .*/a has \[6, 4\]",
    )
    _refused(
        _cli("--inputs", A, str(_ck(tmp_path, "m", model={"hidden_size": 16})), "--output", out),
        r"model config differs .* at 'model.hidden_size' \(16 vs 8\)",
    )
    _refused(
        _cli("--inputs", A, str(_ck(tmp_path, "f", fp="sha256:other")), "--output", out),
        r"descends from base sha256:other, but .*/a from sha256:base",
    )
    _refused(
        _cli("--inputs", A, str(_ck(tmp_path, "n", fp=None)), "--output", out),
        r"/n: descends from base sha256:\w+, but",
    )
    _refused(
        _cli("--inputs", A, B, "--output", out, "--weights", "1"),
        r"--weights: got 1 weights for 2 inputs",
    )
    _refused(
        _cli("--inputs", A, B, "--output", out, "--weights", "1", "-0.5"),
        r"--weights: expected finite non-negative numbers, got -0.5",
    )
    _refused(
        _cli("--inputs", A, B, "--output", out, "--weights", "0", "0"),
        r"--weights: the weights sum to zero",
    )
    _refused(_cli("--inputs", A, A, "--output", out), r"--inputs: .*/a is given twice")
    _refused(_cli("--inputs", A, B, "--output", A, "--overwrite"), r"--output: .* overlaps")
    (tmp_path / "exists").mkdir()
    _refused(
        _cli("--inputs", A, B, "--output", str(tmp_path / "exists")),
        r"--output: .*/exists already exists \(pass --overwrite to replace it\)",
    )
    half = write_synthetic(
        tmp_path / "h",
        {"model.w": torch.zeros(6, 4, dtype=torch.bfloat16), "model.b": torch.zeros(3)},
        meta=synthetic_meta("h", "sha256:base"),
    )
    _refused(
        _cli("--inputs", A, str(half), "--output", out),
        r"'model.w': .*/a stores torch.float32, .*/h stores torch.bfloat16; choose .*--dtype",
    )
    assert _cli("--inputs", A, str(half), "--output", out, "--dtype", "bf16")[0] == 0
    objs = _ck(tmp_path, "o", objects={"model.w._extra_state/shard_0_1": torch.zeros(2)})
    objs2 = _ck(tmp_path, "o2", objects={"model.w._extra_state/shard_0_1": {"x": 1}})
    _refused(
        _cli("--inputs", str(objs), str(objs2), "--output", out + "2"),
        r"non-tensor entry 'model.w._extra_state/shard_0_1' has a different structure",
    )
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    "damage,pattern",
    [
        ("delete", r"/b: missing shard __1_0.distcp"),
        ("metadata", r"/b/.metadata: corrupted metadata"),
        ("meta", r"/b/copd_meta.json: corrupted metadata"),
        ("nometa", r"/b: not a megatron-copd checkpoint \(no copd_meta.json\)"),
    ],
)
def test_refuses_damaged_inputs(tmp_path, damage, pattern):
    a, b = _ck(tmp_path, "a", seed=1), _ck(tmp_path, "b", seed=2)
    if damage == "delete":
        (b / "__1_0.distcp").unlink()
    elif damage == "metadata":
        (b / ".metadata").write_bytes(os.urandom(64))
    elif damage == "meta":
        (b / "copd_meta.json").write_text("{")
    else:
        (b / "copd_meta.json").unlink()
    _refused(_cli("--inputs", str(a), str(b), "--output", str(tmp_path / "out")), pattern)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_corrupted_chunk_mid_merge_leaves_nothing(tmp_path):
    a = _ck(tmp_path, "a", seed=1, shape=(64, 32), chunk_rows=4)
    b = _ck(tmp_path, "b", seed=2, shape=(64, 32), chunk_rows=4)
    with TorchDistReader(b) as r:  # garble the bytes of the last chunk of model.w (index intact)
        last = max(r.info("model.w").chunks, key=lambda c: c.offsets)
    with open(b / last.file, "r+b") as f:
        f.seek(last.offset)
        f.write(b"\0" * last.length)
    code, err = _cli(
        "--inputs",
        str(a),
        str(b),
        "--output",
        str(tmp_path / "out"),
        "--workers",
        "1",
        "--chunk-mb",
        "0.001",
    )
    _refused((code, err), r"/b/__\d_0.distcp: corrupted chunk of 'model.w' at \[60, 0\]")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_overwrite_replaces_only_when_complete(tmp_path):
    a, b = _ck(tmp_path, "a", seed=1), _ck(tmp_path, "b", seed=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker").write_text("old")
    assert _cli("--inputs", str(a), str(b), "--output", str(out), "--overwrite")[0] == 0
    assert not (out / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]
    merged = _all_tensors(out)
    x, y = _all_tensors(a), _all_tensors(b)
    torch.testing.assert_close(merged["model.w"], (x["model.w"] + y["model.w"]) / 2)


def test_optimizer_state_and_integer_tensors(tmp_path):
    extra = {"optimizer.state.exp_avg.model.w": torch.ones(6, 4), "model.n": torch.arange(4)}
    a = _ck(tmp_path, "a", seed=1, extra=extra)
    extra2 = {"optimizer.state.exp_avg.model.w": 3 * torch.ones(6, 4), "model.n": torch.arange(4)}
    b = _ck(tmp_path, "b", seed=2, extra=extra2)
    merge_checkpoints([a, b], tmp_path / "w")
    with TorchDistReader(tmp_path / "w") as r:
        assert sorted(r.tensor_keys()) == ["model.b", "model.n", "model.w"]
        assert torch.equal(r.read("model.n"), torch.arange(4))
    merge_checkpoints([a, b], tmp_path / "all", include_optimizer=True)
    with TorchDistReader(tmp_path / "all") as r:
        assert torch.equal(r.read("optimizer.state.exp_avg.model.w"), 2 * torch.ones(6, 4))


def _start_cli(tmp_path, n_inputs=2, mb=24):
    inputs = []
    for i in range(n_inputs):
        t = {"model.w": torch.full((mb * 2**18 // 64, 64), float(i))}
        inputs.append(str(write_synthetic(tmp_path / f"in{i}", t, chunk_rows=4096, num_files=1)))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(TOOL),
            "--inputs",
            *inputs,
            "--output",
            str(out),
            "--workers",
            "1",
            "--chunk-mb",
            "0.25",
            "--no-progress",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    data = out.with_name("out.tmp") / "__0_0.distcp"
    deadline = time.monotonic() + 120
    while not (data.exists() and data.stat().st_size > 0):  # the merge has started writing
        assert proc.poll() is None and time.monotonic() < deadline, "merge ended before writing"
        time.sleep(0.002)
    return proc, out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_merge_leaves_no_output(tmp_path, sig):
    proc, out = _start_cli(tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert not out.exists(), "an interrupted merge published its output"
    if sig == signal.SIGTERM:  # a clean shutdown also removes the temporary directory
        assert proc.returncode == 130, err
        assert "interrupted; no output written" in err
        assert not out.with_name("out.tmp").exists()
