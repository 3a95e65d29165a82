"""HF <-> megatron conversion on tiny models built from configs (no downloads).

Import: Qwen3, Llama (tied, sharded safetensors input), LLaVA (Qwen3 text) and LLaVA (Llama text,
features from the second-to-last of 3 vision layers) -> torch_dist -> megatron logits equal
transformers' at TP=1 and TP=2. Export: those checkpoints (two of them re-saved by megatron at
TP=2) -> HF -> transformers reloads them with the same logits and the very same tensors. A megatron-born VLM with a
SentencePiece tokenizer (the toy world's kind) exports and generates the same greedy tokens.

Two gloo worlds (TP=1, TP=2) run every megatron-side job once for the whole module.
"""

from __future__ import annotations

import json
from pathlib import Path

import hf_fixtures as F
import pytest
import torch
from harness import run_world
from safetensors import safe_open

from megatron_copd.checkpoint.meta import read_meta
from megatron_copd.config import ModelConfig, VisionConfig
from megatron_copd.config_base import to_dict
from megatron_copd.models.conversion.hf_export import convert_to_hf
from megatron_copd.models.conversion.hf_import import import_from_hf

TOL = 1e-4
CASES = {
    # name: (HF config factory, has image, max_shard_size of the HF save)
    "qwen3": (lambda: F.text_config("qwen3"), False, None),
    "llama_tied": (lambda: F.text_config("llama", tie=True), False, "40KB"),
    "qwen2": (lambda: F.text_config("qwen2"), False, None),
    "llava": (lambda: F.llava_config("qwen3"), True, None),
    "llava_llama_l2": (lambda: F.llava_config("llama", vision_layers=3, feature_layer=-2,
                                              tie=True), True, None),
}
# Exported from a re-save at TP=2 (megatron's writer, TP-sharded chunks); the others straight from
# the import (this project's writer).
RESAVED_TP2 = ("qwen3", "llava")
TOY_VLM = ModelConfig(family="qwen3", vocab_size=F.VOCAB, hidden_size=64, num_layers=2,
                      num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                      max_sequence_length=64,
                      vision=VisionConfig(image_size=16, patch_size=8, hidden_size=32,
                                          num_layers=2, num_attention_heads=2,
                                          ffn_hidden_size=64, class_token=True))


def _hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    sp = F.train_sentencepiece(root / "sp")
    state: dict = {"root": root, "sp": sp, "hf": {}, "ref": {}, "batch": {}, "imported": {}}
    tp1, tp2 = [], []
    for name, (make, images, shard) in CASES.items():
        model = F.build(make(), seed=len(name))
        hf_dir = F.save(model, root / name, shard)
        F.hf_tokenizer_into(hf_dir, sp)
        b = F.batch(images=images)
        state["hf"][name], state["batch"][name] = hf_dir, b
        state["ref"][name] = F.hf_logits(model, b)
        result = import_from_hf(hf_dir, root / f"{name}_mc")
        state["imported"][name] = result
        job = {"model": to_dict(result.model), "load": str(result.output), "batch": b}
        tp1.append(job)
        if name in RESAVED_TP2:
            job = {**job, "save": str(root / f"{name}_tp2"), "meta": read_meta(result.output)}
        tp2.append(job)
    # The language model of a Qwen3-VL, imported alone (text-only).
    qvl = F.build(F.qwen3vl_config(), seed=11)
    F.save(qvl, root / "qwen3vl")
    b = F.batch(images=False, seed=4)
    state["batch"]["qwen3vl"], state["ref"]["qwen3vl"] = b, F.hf_logits(qvl, b)
    result = import_from_hf(root / "qwen3vl", root / "qwen3vl_mc", text_only=True)
    state["imported"]["qwen3vl"] = result
    tp1.append({"model": to_dict(result.model), "load": str(result.output), "batch": b})
    # Megatron-born models (the toy world's kind): a VLM with a class token, and one without
    # (exportable only as its language model).
    state["toy_batch"] = F.batch(images=True, seed=3)
    for name, class_token in [("toy_vlm", True), ("toy_nocls", False)]:
        cfg = to_dict(TOY_VLM)
        cfg["vision"]["class_token"] = class_token
        b = state["toy_batch"] if name == "toy_vlm" else F.batch(images=False, seed=3)
        state["batch"][name] = b
        tp1.append({"model": cfg, "load": None, "randomise": True, "seed": 5, "batch": b,
                    "save": str(root / name), "greedy": 6,
                    "meta": {"format": 1, "model": cfg, "branch": "merged",
                             "base_fingerprint": None, "tokenizer": str(sp)}})
    state["tp1"] = dict(zip([*CASES, "qwen3vl", "toy_vlm", "toy_nocls"], run_world(
        F.megatron_worker, 1, args=(1, tp1))[0]))
    state["tp2"] = dict(zip(CASES, run_world(F.megatron_worker, 2, args=(2, tp2))[0]))
    return state


@pytest.mark.parametrize("name", list(CASES))
def test_import_logits_match_transformers_tp1_tp2(conv, name):
    ref = conv["ref"][name]
    for tp in ("tp1", "tp2"):
        got = conv[tp][name]["logits"]
        assert got.shape == ref.shape
        diff = (got - ref).abs().max().item()
        assert diff <= TOL, (name, tp, diff)


def test_imported_model_config(conv):
    r = conv["imported"]["llava_llama_l2"]
    assert r.architecture == "LlavaForConditionalGeneration"
    assert r.model.family == "llama" and not r.model.use_qk_norm and r.model.tie_embeddings
    assert r.model.vision.num_layers == 2  # feature layer -2 of 3: the last layer is unused
    assert r.model.vision.tokens_per_image == 5 and r.image_token_id == F.IMAGE_TOKEN
    out = r.output
    snippet = (out / "copd_model.yaml").read_text()
    assert "num_layers: 2" in snippet and str(out / "tokenizer") in snippet
    tok = json.loads((out / "tokenizer" / "copd_tokenizer.json").read_text())
    assert tok == {"image_token": "<image>", "library": "huggingface"}
    from megatron_copd.data.tokenizer import Tokenizer

    loaded = Tokenizer.load(out / "tokenizer")  # what data.tokenizer gives a run
    assert loaded.library == "huggingface" and loaded.image_token_id == F.IMAGE_TOKEN
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, 3)
    assert conv["imported"]["qwen3"].model.use_qk_norm


@pytest.mark.parametrize("name", list(CASES))
def test_export_reloads_in_transformers_with_same_logits_and_tensors(conv, name):
    import transformers as T

    root = conv["root"]
    out = root / f"{name}_hf"
    src = root / f"{name}_tp2" if name in RESAVED_TP2 else conv["imported"][name].output
    result = convert_to_hf(src, out,
                           tokenizer=conv["imported"][name].output / "tokenizer",
                           max_shard_bytes=60_000)
    assert result.shards > 1 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_hf_tensors(out))
    cls = T.LlavaForConditionalGeneration if "llava" in name else T.AutoModelForCausalLM
    model = cls.from_pretrained(str(out)).eval()
    diff = (F.hf_logits(model, conv["batch"][name]) - conv["ref"][name]).abs().max().item()
    assert diff <= TOL, (name, diff)

    # Round trip HF -> megatron (TP=2 re-save) -> HF: the very same tensors.
    before, after = _hf_tensors(conv["hf"][name]), _hf_tensors(out)
    for key, t in after.items():
        if "post_layernorm" in key:  # unused by LLaVA; ours has none: exported as identity
            assert torch.equal(t, torch.ones_like(t) if key.endswith("weight") else
                               torch.zeros_like(t))
            continue
        assert torch.equal(t, before[key]), key
    dropped = set(before) - set(after)
    if name == "llava_llama_l2":
        assert dropped == {k for k in before if ".layers.2." in k and "vision" in k}
    else:
        assert dropped == set()
    tok = T.AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids("<image>") == F.IMAGE_TOKEN
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 3)


def test_export_bf16_import_bf16(conv):
    import transformers as T

    root = conv["root"]
    imported = import_from_hf(conv["hf"]["qwen3"], root / "qwen3_bf16", dtype=torch.bfloat16)
    out = root / "qwen3_bf16_hf"
    convert_to_hf(imported.output, out)
    before, after = _hf_tensors(conv["hf"]["qwen3"]), _hf_tensors(out)
    assert set(before) == set(after)
    for k, t in after.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, before[k].to(torch.bfloat16)), k
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = T.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    diff = (F.hf_logits(model, conv["batch"]["qwen3"]) - conv["ref"]["qwen3"]).abs().max()
    assert 0 < diff < 0.5  # bf16 rounding, nothing worse


def test_toy_vlm_with_sentencepiece_exports_and_generates_the_same(conv):
    import transformers as T

    root = conv["root"]
    out = root / "toy_vlm_hf"
    result = convert_to_hf(root / "toy_vlm", out)  # tokenizer recorded in copd_meta.json
    assert result.architecture == "LlavaForConditionalGeneration"
    model = T.LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    b = conv["batch"]["toy_vlm"]
    mine = conv["tp1"]["toy_vlm"]
    diff = (F.hf_logits(model, b) - mine["logits"]).abs().max().item()
    assert diff <= TOL, diff
    model.generation_config.eos_token_id = None  # compare a fixed number of tokens
    with torch.no_grad():
        gen = model.generate(input_ids=b["ids"], pixel_values=b["pixels"], max_new_tokens=6,
                             do_sample=False)
    assert torch.equal(gen[:, b["ids"].shape[1]:], mine["greedy"])
    # The SentencePiece tokenizer became an HF one that encodes identically.
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(conv["sp"] / "tokenizer.model"))
    tok = T.AutoTokenizer.from_pretrained(str(out))
    text = "What is 12 + 30? how many red circles  are there"
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    # Text around the image token: each piece on its own, as data.prompting encodes prompts.
    with_image = tok.encode("Look: <image> how many?", add_special_tokens=False)
    assert with_image == sp.encode("Look: ") + [F.IMAGE_TOKEN] + sp.encode(" how many?")
    proc = T.AutoProcessor.from_pretrained(str(out))
    from PIL import Image

    enc = proc(text="<image> count", images=Image.new("RGB", (40, 30)), return_tensors="pt")
    assert int((enc["input_ids"] == F.IMAGE_TOKEN).sum()) == TOY_VLM.vision.tokens_per_image
    assert tuple(enc["pixel_values"].shape) == (1, 3, 16, 16)


def test_vlm_without_class_token_exports_text_only(conv):
    import transformers as T

    from megatron_copd.errors import UserError

    root = conv["root"]
    with pytest.raises(UserError, match="class_token"):
        convert_to_hf(root / "toy_nocls", root / "nocls_hf")
    assert not (root / "nocls_hf").exists()
    assert not list(root.glob(".nocls_hf.tmp*"))
    out = root / "nocls_text_hf"
    result = convert_to_hf(root / "toy_nocls", out, text_only=True)
    assert result.architecture == "Qwen3ForCausalLM"
    model = T.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    b = conv["batch"]["toy_nocls"]
    diff = (F.hf_logits(model, b) - conv["tp1"]["toy_nocls"]["logits"]).abs().max().item()
    assert diff <= TOL, diff


def test_qwen3_vl_language_model_imports_text_only(conv):
    r = conv["imported"]["qwen3vl"]
    assert r.architecture == "Qwen3VLForConditionalGeneration" and r.model.vision is None
    assert r.model.use_qk_norm and r.model.qwen_vl is None
    diff = (conv["tp1"]["qwen3vl"]["logits"] - conv["ref"]["qwen3vl"]).abs().max().item()
    assert diff <= TOL, diff  # multimodal RoPE on text == plain RoPE
    # Without --text-only the whole model comes in (tests/test_qwen_vl.py checks its logits).
    full = import_from_hf(conv["root"] / "qwen3vl", conv["root"] / "qwen3vl_full")
    assert full.model.qwen_vl is not None and full.model.qwen_vl.depth == 1
