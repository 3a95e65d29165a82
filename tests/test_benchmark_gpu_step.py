"""benchmarks/gpu_step.py: the FLOP count it reports MFU with, its CPU smoke run (--tiny), and
its refusal to run real sizes without a GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_step.py"
ENV = {"PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"}


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while being created
    spec.loader.exec_module(mod)
    return mod


def test_flop_count_of_a_qwen3_shape():
    b = _bench()
    s = b.Shape.of(b.SHAPES["1.7b"])
    per_layer = 2048 * (2048 + 2 * 1024) + 2048 * 2048 + 3 * 2048 * 6144
    assert s.gemm_params == 28 * per_layer + 2048 * 151936  # ~1.72 B, the LM head included
    # 6N per token plus the causal attention term, 3x its forward cost.
    attn_fwd = 2 * 28 * 16 * 128 * (1024**2 + 512**2)
    assert b.train_flops(s, [1024, 512]) == 6 * s.gemm_params * 1536 + 3 * attn_fwd
    assert b.forward_flops(s, [1024, 512]) == 2 * s.gemm_params * 1536 + attn_fwd
    assert b.device_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert b.device_peak("NVIDIA H100 PCIe") == 756e12
    assert b.device_peak("NVIDIA H200") == 989e12
    assert b.device_peak("Some Other Accelerator") is None


def test_tiny_run_prints_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--json", str(out)],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900, check=False,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for key in ("train_tokens_per_s", "train_mfu", "rollout_tokens_per_s",
                "scoring_tokens_per_s", "FLOPs: train 6*N*tokens"):
        assert key in p.stdout, p.stdout
    data = json.loads(out.read_text())
    (res,) = data["results"]
    for key in ("train_tokens_per_s", "rollout_tokens_per_s", "scoring_tokens_per_s"):
        assert res[key] > 0
    if not torch.cuda.is_available():
        assert res["precision"] == "fp32" and res["train_mfu"] is None  # no known CPU peak


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_real_sizes_are_refused_without_a_gpu():
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "1.7b"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300, check=False,
    )
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "needs a CUDA GPU" in p.stderr
