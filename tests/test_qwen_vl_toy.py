"""A Qwen3-VL-shaped 2-branch CoPD run on the toy world, end to end (tiny sizes): the usual run
directory, and the merged model exported to Hugging Face answers held-out image items with the
same greedy tokens in transformers as in megatron."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from harness import run_world

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
QWEN_VL = {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
           "patch_size": 8, "num_position_embeddings": 16, "deepstack_visual_indexes": [0],
           "mrope_section": [2, 3, 3], "vision_start_token_id": 5, "vision_end_token_id": 6,
           "image_token_id": 7, "video_token_id": 8, "min_pixels": 1024, "max_pixels": 4096,
           "max_frames": 4}
TINY = {
    "seed": 3,
    "model": {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4,
              "num_query_groups": 2, "ffn_hidden_size": 128, "max_sequence_length": 192,
              "vision": None, "qwen_vl": QWEN_VL},
    "branches": [{"name": "text", "domains": ["text"]}, {"name": "image", "domains": ["image"]}],
    "schedule": {"cycles": 1, "s_rl": 1, "s_opd": 2},
    "grpo": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 5, "micro_batch_size": 4,
             "reward_workers": 0},
    "opd": {"prompts_per_step": 2},
    "optim": {"lr": 1e-3},
    "data": {"train_size": 60, "eval_size": 12, "base_warmup_steps": 30,
             "base_warmup_batch": 8},
    "eval": {"max_items": 12, "batch_size": 12},
    "logging": {"progress": False},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-toy")
    cfg = json.loads(json.dumps(TINY))
    cfg["run_dir"] = str(root / "run")
    cfg["data"]["cache_dir"] = str(root / "cache")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "megatron_copd.cli", "train", str(path)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


def test_run_directory(run):
    d = run / "run"
    records = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    edges = [r for r in records if "teacher" in r]
    assert {(r["student"], r["teacher"]) for r in edges} == {("text", "image"), ("image", "text")}
    assert all(0.0 <= r["overlap_top10"] <= 1.0 for r in edges)
    assert (d / "merged").is_dir()
    results = json.loads((d / "results.json").read_text())
    for model in ("base", "merged"):
        assert set(results[model]) == {"text", "image"}, results
    assert set(results["branches"]) == {"text", "image"}


def _check(rank, world, run_dir: str, hf: str, items: int):
    from megatron_copd.models.conversion.export_check import check_export

    return check_export(str(Path(run_dir) / "config.yaml"), str(Path(run_dir) / "merged"), hf,
                        "image", items)


def test_merged_export_answers_like_megatron(run, tmp_path):
    """tools/convert_to_hf.py on the merged checkpoint (no --tokenizer: the run recorded it),
    then tools/check_export.py's comparison: the same greedy answers in transformers."""
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "tools/convert_to_hf.py", "--checkpoint",
                           str(run / "run" / "merged"), "--output", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "Qwen3VLForConditionalGeneration"]
    assert json.loads((out / "preprocessor_config.json").read_text())["patch_size"] == 8
    r = run_world(_check, 1, args=(str(run / "run"), str(out), 12))[0]
    assert r.items == 12 and r.answered >= 3, r  # answers, not an immediate EOS
    assert r.ok, r.mismatches


def test_check_export_tool_reports_a_different_model(run, tmp_path):
    """The tool exits 1 and names the items when the export does not compute the checkpoint's
    model (here: the final norm's sign flipped in the exported weights)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "hf_bad"
    subprocess.run([sys.executable, "tools/convert_to_hf.py", "--checkpoint",
                    str(run / "run" / "merged"), "--output", str(out)],
                   check=True, capture_output=True, timeout=300, cwd=REPO)
    for f in out.glob("*.safetensors"):
        t = load_file(str(f))
        if "model.language_model.norm.weight" in t:
            t["model.language_model.norm.weight"] = -t["model.language_model.norm.weight"]
            save_file(t, str(f), metadata={"format": "pt"})
    proc = subprocess.run([sys.executable, "tools/check_export.py", "--config",
                           str(run / "run" / "config.yaml"), "--checkpoint",
                           str(run / "run" / "merged"), "--hf", str(out), "--items", "12"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "greedy answers equal on 0/12" in proc.stdout, proc.stdout
    assert "item 0: megatron" in proc.stdout, proc.stdout
