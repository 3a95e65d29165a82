"""`copd check`: layout report, problems and exit status, base-checkpoint compatibility."""

import argparse
import json

from megatron_copd.config import load_config, to_dict
from megatron_copd.launch_check import check, check_command, compare_model
from megatron_copd.model_size import memory_per_gpu, model_size, params_per_gpu

HUB = "examples/cluster/copd_3branch_hub.yaml"


def _args(config, overrides=(), nodes=1, gpus=2, mem=80.0):
    return argparse.Namespace(
        config=config,
        overrides=list(overrides),
        nodes=nodes,
        gpus_per_node=gpus,
        gpu_memory_gb=mem,
    )


def test_toy_layout_is_ok(capsys, tmp_path):
    rc = check_command(_args(None, [f"run_dir={tmp_path / 'run'}"]))
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "2 = 2 branches x TP1 x PP1 x CP1 x DP1" in out.out
    assert "branch text     ranks 0-0, node(s) 0 (shared with image)" in out.out
    assert "edges           image->text, text->image" in out.out
    assert "Result: OK" in out.out and out.err == ""


def test_hub_layout_on_96_gpus_places_branches_on_whole_nodes():
    r = check(HUB, [], nodes=12, gpus_per_node=8)
    text = r.text()
    assert "96 = 3 branches x TP4 x PP2 x CP1 x DP4 (32 ranks per branch)" in text
    assert "branch text     ranks 0-31, node(s) 0-3" in text
    assert "branch video    ranks 64-95, node(s) 8-11" in text
    assert "TP groups       24/24 of size 4 inside one node" in text
    assert "image->text, text->image, text->video, video->text" in text
    # The example's data and model paths are placeholders: each is one problem line.
    assert any("checkpoint.load: directory not found" in p for p in r.problems)
    assert all("world size" not in p for p in r.problems)


def test_world_size_that_does_not_divide_is_one_clear_problem(capsys):
    rc = check_command(_args(HUB, nodes=8, gpus=8))
    err = capsys.readouterr().err.splitlines()
    assert rc == 2
    assert err[0] == (
        "copd check: world size 64 is not divisible by branches x TP x PP x CP = 3 x 4 x 2 x 1 = "
        "24; with 8 GPUs per node use 3, 6, 9 ... nodes (24, 48, 72 GPUs), or change parallel.tp/pp"
    )


def test_tp_groups_crossing_nodes_warn(tmp_path):
    r = check(None, ["parallel.tp=2", f"run_dir={tmp_path}"], nodes=4, gpus_per_node=3)
    assert not r.problems
    assert any("TP groups cross nodes" in w for w in r.warnings), r.warnings
    assert "TP groups       4/6 of size 2 inside one node" in r.text()


def test_memory_problem_and_bad_hub(tmp_path):
    r = check(None, [f"run_dir={tmp_path}"], nodes=1, gpus_per_node=2, gpu_memory_gb=0.001)
    assert any(p.startswith("memory: weights, gradients and optimizer") for p in r.problems)
    r = check(None, ["schedule.topology=hub", "schedule.hub=audio"], nodes=1, gpus_per_node=2)
    assert "schedule.hub: unknown branch 'audio'; expected one of ['text', 'image']" in r.problems


def _fake_checkpoint(path, model: dict | None):
    path.mkdir()
    (path / ".metadata").write_bytes(b"")
    meta = {"branch": "base"} if model is None else {"model": model}
    (path / "copd_meta.json").write_text(json.dumps(meta))


def test_base_checkpoint_compatibility(tmp_path):
    cfg = load_config()
    good, bad = tmp_path / "good", tmp_path / "bad"
    _fake_checkpoint(good, to_dict(cfg.model))
    wrong = to_dict(cfg.model)
    wrong["hidden_size"] = 256
    wrong["qwen_vl"]["patch_size"] = 4
    _fake_checkpoint(bad, wrong)
    r = check(None, [f"checkpoint.load={good}"], nodes=1, gpus_per_node=2)
    assert not r.problems and "model shape matches the config" in r.text()
    r = check(None, [f"checkpoint.load={bad}"], nodes=1, gpus_per_node=2)
    assert f"checkpoint.load: {bad}: model.hidden_size: checkpoint has 256, config has 128" in (
        r.problems
    )
    assert any("model.qwen_vl.patch_size: checkpoint has 4" in p for p in r.problems)
    (bad / "copd_meta.json").write_text("{not json")
    r = check(None, [f"checkpoint.load={bad}"], nodes=1, gpus_per_node=2)
    assert any("corrupted metadata" in p for p in r.problems)


def test_compare_model_vision_presence():
    cfg = to_dict(load_config("examples/toy/copd_clip.yaml").model)
    text_only = dict(cfg, vision=None)
    assert compare_model(text_only, cfg) == [
        "model.vision: the checkpoint has no vision tower, the config does"
    ]
    qwen = to_dict(load_config().model)
    assert compare_model(dict(qwen, qwen_vl=None), qwen) == [
        "model.qwen_vl: the checkpoint has no Qwen-VL vision tower, the config does"]
    assert compare_model(cfg, qwen) == [
        "model.vision: the checkpoint has a vision tower, the config does not",
        "model.qwen_vl: the checkpoint has no Qwen-VL vision tower, the config does"]
    old = {k: v for k, v in qwen.items() if k != "qwen_vl"}  # written before the section
    assert compare_model(old, dict(qwen, qwen_vl=None)) == []
    q25 = dict(qwen, family="qwen2", qwen_vl=dict(qwen["qwen_vl"], version="qwen2_5_vl"))
    assert compare_model(q25, qwen) == [
        "model.family: checkpoint has 'qwen2', config has 'qwen3'",
        "model.qwen_vl.version: checkpoint has 'qwen2_5_vl', config has 'qwen3_vl'"]


def test_memory_estimate_arithmetic():
    cfg = load_config(HUB, [], world_size=96, check_device=False)
    size = model_size(cfg.model)
    stages = params_per_gpu(cfg)
    assert len(stages) == 2
    # Stage 0 holds the embedding and the vision tower, stage 1 the untied output layer.
    half = size.per_layer * 18
    assert stages[0] == (half + size.embedding + size.vision) // 4
    assert stages[1] == (half + size.output + size.final_norm) // 4
    mem = memory_per_gpu(cfg)
    assert mem.bytes_per_param == 6 + 12 / 4  # bf16, distributed optimizer over DP4
    assert abs(mem.gib - max(stages) * 9 / 2**30) < 1e-9
