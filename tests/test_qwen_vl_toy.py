"""A Qwen3-VL-shaped 2-branch CoPD run on the toy world, end to end (tiny sizes): the usual run
directory, and the merged model exported to Hugging Face answers held-out image items with the
same greedy tokens in transformers as in megatron."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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


def _megatron_answers(rank, world, ckpt: str, cfg_path: str, items: int):
    from megatron_copd.checkpoint.model_io import load_model
    from megatron_copd.config import load_config
    from megatron_copd.data.prompting import encode_prompt
    from megatron_copd.models.factory import build_model
    from megatron_copd.rollout import inputs
    from megatron_copd.rollout.generation import generate
    from megatron_copd.rollout.sampling import SamplingParams
    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.megatron_state import init_megatron_state
    from megatron_copd.training.run import Resources

    cfg = load_config(cfg_path, ["branches=[{name: image, domains: [image]}]"], world_size=1)
    res = Resources(cfg)
    groups = build_branch_groups(BranchLayout.from_world(("image",), world, tp=1, pp=1))
    init_megatron_state(groups, 1)
    model = build_model(cfg, groups.pgs).eval()
    load_model(model, groups.pgs, ckpt)
    recs = res.sources.eval["image"][:items]
    enc = [encode_prompt(r, res.tokenizer, cfg.model.vision_side, 256) for r in recs]
    ro = generate(model, groups.pgs, [e.token_ids for e in enc],
                  SamplingParams(max_new_tokens=8, temperature=0.0,
                                 stop_ids=(res.tokenizer.eos_id,)),
                  pixels=inputs.concat_media([e.pixels for e in enc]), kv_batch_size=items,
                  pad_id=res.tokenizer.pad_id)
    return [e.token_ids for e in enc], [e.pixels for e in enc], ro.responses()


def test_merged_export_answers_like_megatron(run, tmp_path):
    import transformers as T

    from megatron_copd.models.conversion.hf_export import convert_to_hf

    out = tmp_path / "hf"
    convert_to_hf(run / "run" / "merged", out)
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "Qwen3VLForConditionalGeneration"]
    assert json.loads((out / "preprocessor_config.json").read_text())["patch_size"] == 8
    model = T.AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    prompts, media, ours = run_world(_megatron_answers, 1, args=(
        str(run / "run" / "merged"), str(run / "tiny.yaml"), 12))[0]
    eos = 2
    assert sum(len(w) > 1 for w in ours) >= 3, ours  # answers, not an immediate EOS
    for ids, m, want in zip(prompts, media, ours):
        x = torch.tensor([ids])
        types = (x == 7).long()
        with torch.no_grad():
            gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                 mm_token_type_ids=types, pixel_values=m.pixel_values,
                                 image_grid_thw=m.image_grid_thw, max_new_tokens=8,
                                 do_sample=False, eos_token_id=eos, pad_token_id=eos,
                                 suppress_tokens=[7, 8])
        got = gen[0, len(ids):].tolist()
        got = got[:got.index(eos) + 1] if eos in got else got
        assert got == want, (got, want)
