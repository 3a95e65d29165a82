"""Tiny Hugging Face models built from configs (no downloads) for the conversion tests.

Every parameter is randomised (norm weights around 1, biases non-zero), so a mapping that swaps
two norms or drops a bias changes the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_TOKEN = 4
VOCAB = 256
SEQ = 24


def _randomise(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "embedding" in name or "embed_tokens" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.15 * noise)


def text_config(family: str, tie: bool = False, **kw):
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                  bos_token_id=1, eos_token_id=2, pad_token_id=3)
    common.update(kw)
    if family == "qwen3":
        return T.Qwen3Config(**common)
    if family == "qwen2":  # Q/K/V bias, no QK-norm (Qwen2.5's decoder)
        return T.Qwen2Config(**common)
    return T.LlamaConfig(attention_bias=False, mlp_bias=False, **common)


def llava_config(text_family: str = "qwen3", vision_layers: int = 2, feature_layer: int = -1,
                 tie: bool = False):
    import transformers as T

    vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                                num_attention_heads=2, image_size=16, patch_size=8,
                                hidden_act="gelu", projection_dim=32)
    return T.LlavaConfig(vision_config=vision.to_dict(),
                         text_config=text_config(text_family, tie=tie).to_dict(),
                         image_token_id=IMAGE_TOKEN, image_seq_length=5,
                         vision_feature_layer=feature_layer,
                         vision_feature_select_strategy="full", tie_word_embeddings=tie)


def qwen3vl_config():
    """A tiny Qwen3-VL (interleaved multimodal RoPE, DeepStack vision) for text-only import."""
    import transformers as T

    text = text_config("qwen3").to_dict()
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                               "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    return T.Qwen3VLConfig(text_config=text, vision_config=dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
        deepstack_visual_indexes=[0]))


def build(config, seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    if config.model_type == "llava":
        model = T.LlavaForConditionalGeneration(config)
    elif config.model_type == "qwen3_vl":
        model = T.Qwen3VLForConditionalGeneration(config)
    else:
        model = T.AutoModelForCausalLM.from_config(config)
    _randomise(model, seed)
    return model.eval()


def save(model, path: Path, max_shard_size: str | None = None) -> Path:
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kw)
    return path


def batch(images: bool = False, seed: int = 1) -> dict:
    """Token ids [2, SEQ] (+ one 16x16 image in sample 0 at positions 3..7 for the VLM)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(IMAGE_TOKEN + 1, VOCAB, (2, SEQ), generator=g)
    pixels = None
    if images:
        ids[0, 3:8] = IMAGE_TOKEN  # 4 patches + the class token
        pixels = torch.randn(1, 3, 16, 16, generator=g)
    return {"ids": ids, "pixels": pixels}


def hf_logits(model, b: dict) -> torch.Tensor:
    with torch.no_grad():
        kw = {"pixel_values": b["pixels"]} if b["pixels"] is not None else {}
        return model(input_ids=b["ids"], **kw).logits.float()


def megatron_worker(rank, world, tp: int, jobs: list[dict]):
    """Run megatron-side jobs at TP=tp. A job: ``model`` (ModelConfig mapping), ``load`` (a
    checkpoint, or None for seeded random weights), ``save`` (re-save there, with ``meta``),
    ``batch`` -> TP-gathered logits, ``greedy`` (new tokens of a no-cache greedy loop from
    ``batch['ids']``)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_copd.checkpoint.model_io import load_model, save_model
    from megatron_copd.config import RunConfig
    from megatron_copd.config_base import from_dict
    from megatron_copd.models.factory import build_model
    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.megatron_state import init_megatron_state

    out = []
    for job in jobs:
        cfg = from_dict(RunConfig, {"branches": [{"name": "a", "domains": ["text"]}],
                                    "parallel": {"tp": tp}, "model": job["model"]})
        groups = build_branch_groups(BranchLayout.from_world(("a",), world, tp=tp, pp=1))
        init_megatron_state(groups, job.get("seed", 99))
        model = build_model(cfg, groups.pgs, image_token_id=IMAGE_TOKEN).eval()
        if job.get("randomise"):
            _randomise_megatron(model, job.get("seed", 99))
        if job.get("load"):
            load_model(model, groups.pgs, job["load"])
        if job.get("save"):
            save_model(model, groups.pgs, job["save"], job["meta"])

        def logits(ids, pixels, model=model, groups=groups):
            s = ids.shape[1]
            pos = torch.arange(s).unsqueeze(0).expand(ids.shape[0], -1)
            mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1).view(1, 1, s, s)
            with torch.no_grad():
                full = model(ids, pos, mask, pixels=pixels)
            return gather_from_tensor_model_parallel_region(full, group=groups.pgs.tp)

        b = job["batch"]
        result = {"logits": logits(b["ids"], b["pixels"])}
        if job.get("greedy"):
            ids = b["ids"]
            for _ in range(job["greedy"]):
                nxt = logits(ids, b["pixels"])[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], dim=1)
            result["greedy"] = ids[:, b["ids"].shape[1]:]
        out.append(result)
    return out


def _randomise_megatron(model, seed: int) -> None:
    """Same recipe as _randomise for a megatron model (norm weights around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if ("norm" in name or "ln_pre" in name) and "weight" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif "bias" in name and ("norm" in name or "ln_pre" in name):
                p.copy_(0.2 * noise)
            elif "embedding" in name or "class_token" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.15 * noise)


# -- tokenizers ---------------------------------------------------------------------------------

WORDS = ("red", "blue", "green", "circle", "square", "how", "many", "are", "there", "answer",
         "is", "the", "what", "moves", "left", "right", "count", "shapes")


def train_sentencepiece(path: Path, vocab_size: int = 200) -> Path:
    """A tiny SentencePiece BPE model with the toy tokenizer's settings (ids: unk 0, bos 1,
    eos 2, pad 3, ``<image>`` 4)."""
    import io
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    texts = []
    for _ in range(500):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
        texts.append(f"What is {a} + {b}? {words} <image> {a + b}.")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=False, split_digits=True,
        character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=["<image>"], unk_id=0, bos_id=1,
        eos_id=2, pad_id=3, num_threads=1, minloglevel=2,
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    (path / "copd_tokenizer.json").write_text(
        '{"library": "sentencepiece", "image_token": "<image>", "model_file": "tokenizer.model"}'
    )
    return path


def hf_tokenizer_into(hf_dir: Path, sp_dir: Path) -> None:
    """Give an HF model directory a tokenizer (the SentencePiece one, converted)."""
    from megatron_copd.models.conversion.sp_to_hf import sentencepiece_to_hf

    sentencepiece_to_hf(sp_dir / "tokenizer.model", hf_dir, "<image>")
