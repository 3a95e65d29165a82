"""`copd selftest` run plainly: the local launcher starts the ranks, every check passes."""

import json
import subprocess
import sys
from pathlib import Path

from megatron_copd.config import load_config
from megatron_copd.model_size import params_per_gpu

REPO = Path(__file__).resolve().parents[1]


def test_plain_selftest_pipeline_two_stages(tmp_path):
    """1 branch x PP2 = 2 local ranks: groups, PP hidden-state hand-off, logits, param counts."""
    overrides = ["branches=[{name: solo, domains: [text]}]", "parallel.pp=2",
                 f"run_dir={tmp_path}"]
    p = subprocess.run(
        [sys.executable, "-m", "megatron_copd.cli", "selftest", *overrides, "--p2p-mb", "0.1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "copd selftest: OK" in p.stdout
    (record,) = [json.loads(x) for x in (tmp_path / "selftest.jsonl").read_text().splitlines()]
    assert record["ok"] and record["launcher"] == "local" and record["world_size"] == 2
    ranks = sorted(record["ranks"], key=lambda r: r["rank"])
    assert [r["coords"]["pp"] for r in ranks] == [0, 1]
    assert all(r["forward_s"] is not None for r in ranks)
    # Every group check ran (pp and embd link the two stages).
    assert {"world", "branch", "tp", "pp", "dp", "embd"} <= set(ranks[0]["allreduce_ms"])
    # The copd-check estimate counts exactly what the factory builds on each stage.
    cfg = load_config(None, overrides[:2])
    assert [r["params"] for r in ranks] == params_per_gpu(cfg)
