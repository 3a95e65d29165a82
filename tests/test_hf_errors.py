"""Bad input to the converters ends in one clear line (and exit status 2 from the tools), and
never leaves an output behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import hf_fixtures as F
import pytest
import torch

from megatron_copd.errors import UserError
from megatron_copd.models.conversion.hf_export import convert_to_hf
from megatron_copd.models.conversion.hf_import import import_from_hf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("hferr")
    F.save(F.build(F.text_config("qwen3")), root / "qwen3")
    F.save(F.build(F.text_config("llama")), root / "sharded", "20KB")
    sp = F.train_sentencepiece(root / "sp")
    F.hf_tokenizer_into(root / "qwen3", sp)
    imported = import_from_hf(root / "qwen3", root / "ckpt")
    return {"root": root, "ckpt": imported.output}


def _variant(base, name: str, edit) -> Path:
    d = base["root"] / name
    if not d.exists():
        shutil.copytree(base["root"] / "qwen3", d)
        cfg = json.loads((d / "config.json").read_text())
        edit(cfg, d)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


def _import_error(src: Path, out: Path) -> str:
    with pytest.raises(UserError) as e:
        import_from_hf(src, out)
    msg = str(e.value)
    assert "\n" not in msg
    assert not out.exists() and not list(out.parent.glob(out.name + ".tmp*"))
    return msg


def test_unsupported_architecture(base):
    def edit(cfg, d):
        cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])

    msg = _import_error(_variant(base, "mistral", edit), base["root"] / "o1")
    assert "MistralForCausalLM" in msg and "not supported" in msg and "config.json" in msg


def test_missing_shard(base):
    d = base["root"] / "sharded"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = d / sorted(set(index["weight_map"].values()))[1]
    keep = victim.read_bytes()
    victim.unlink()
    try:
        msg = _import_error(d, base["root"] / "o2")
    finally:
        victim.write_bytes(keep)
    assert "missing shard" in msg and victim.name in msg


def test_config_weight_shape_mismatch(base):
    def edit(cfg, d):
        cfg["intermediate_size"] = 128

    msg = _import_error(_variant(base, "wide", edit), base["root"] / "o3")
    assert "mlp.gate_proj.weight" in msg and "[96, 64]" in msg and "[128, 64]" in msg


def test_weights_the_config_does_not_explain(base):
    def edit(cfg, d):
        cfg["num_hidden_layers"] = 1
        cfg["layer_types"] = cfg["layer_types"][:1]

    msg = _import_error(_variant(base, "shallow", edit), base["root"] / "o4")
    assert "unexpected tensor 'model.layers.1." in msg


def test_no_safetensors(base):
    d = base["root"] / "bin_only"
    d.mkdir()
    shutil.copy(base["root"] / "qwen3" / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"x")
    assert "only safetensors" in _import_error(d, base["root"] / "o5")


def test_export_checkpoint_config_mismatch(base, tmp_path):
    bad = tmp_path / "ckpt"
    shutil.copytree(base["ckpt"], bad)
    meta = json.loads((bad / "copd_meta.json").read_text())
    meta["model"]["ffn_hidden_size"] = 128
    (bad / "copd_meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as e:
        convert_to_hf(bad, tmp_path / "out")
    assert "linear_fc1.weight" in str(e.value) and "[2, 192, 64]" in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))


def test_export_refuses_existing_output_and_non_checkpoints(base, tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="already exists"):
        convert_to_hf(base["ckpt"], tmp_path / "exists")
    with pytest.raises(UserError, match="not a torch_dist checkpoint"):
        convert_to_hf(base["root"] / "qwen3", tmp_path / "out")


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_tools_exit_2_with_one_line(base):
    root = base["root"]
    r = _tool("import_from_hf.py", "--hf", str(_variant(base, "mistral", lambda c, d: c.update(
        model_type="mistral", architectures=["MistralForCausalLM"]))), "--output",
        str(root / "o6"))
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("import_from_hf: error:")]
    assert len(lines) == 1 and "MistralForCausalLM" in lines[0]
    r = _tool("import_from_hf.py", "--hf", str(root / "qwen3"), "--output", str(root / "o7"),
              "--tp", "3")
    assert r.returncode == 2 and "parallel.tp: 3 must divide" in r.stderr
    r = _tool("convert_to_hf.py", "--checkpoint", str(root / "qwen3"), "--output",
              str(root / "o8"))
    assert r.returncode == 2 and "convert_to_hf: error:" in r.stderr
    assert not (root / "o6").exists() and not (root / "o7").exists()


def test_branch_checkpoint_with_optimizer_state_and_latest_pointer(base, tmp_path):
    """A training checkpoint: model weights beside Adam moments keyed by parameter, found through
    the branch directory's ``latest`` file."""
    from megatron_copd.checkpoint.torch_dist_io import TorchDistReader, TorchDistWriter

    branch = tmp_path / "text"
    with TorchDistReader(base["ckpt"]) as r, TorchDistWriter(branch / "iter_0000003") as w:
        for key in r.tensor_keys():
            t = r.read(key)
            for k in (key, f"optimizer.state.exp_avg.{key}"):
                w.declare_tensor(k, tuple(t.shape), t.dtype)
                w.write_chunk(k, (0,) * t.dim(), t if k == key else torch.zeros_like(t))
        for key in r.bytes_keys():
            w.write_bytes(key, r.read_bytes(key))
        w.meta = json.loads((base["ckpt"] / "copd_meta.json").read_text())
        w.commit()
    (branch / "latest").write_text("iter_0000003\n")
    out = convert_to_hf(branch, tmp_path / "hf", tokenizer=base["ckpt"] / "tokenizer")
    assert out.architecture == "Qwen3ForCausalLM"
    with pytest.raises(UserError, match="no model under prefix 'x.'"):
        convert_to_hf(branch, tmp_path / "hf2", prefix="x.")
