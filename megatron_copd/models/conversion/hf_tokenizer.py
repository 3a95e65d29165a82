"""Tokenizer files across the conversion: copy an HF tokenizer in on import, and write
tokenizer files transformers loads on export (HF tokenizers copied; the toy SentencePiece
tokenizer converted to a ``tokenizer.json``).

The directory layout this project's tokenizer wrapper (``megatron_copd.data.tokenizer``) reads:
HF files plus ``copd_tokenizer.json`` (``{"library": "huggingface"|"sentencepiece",
"image_token": ...}``), or a SentencePiece ``tokenizer.model``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_copd.errors import CheckpointError

COPD_FILE = "copd_tokenizer.json"
SP_MODEL_FILE = "tokenizer.model"
# Files that make up an HF tokenizer / processor (whatever of these exists is copied).
HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja",
    "chat_template.json",
)
HF_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json",
                      "video_preprocessor_config.json")


@dataclass
class TokenizerInfo:
    library: str
    """'huggingface' or 'sentencepiece'."""
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    image_token: str | None = None
    image_token_id: int | None = None


def has_hf_tokenizer(d: Path) -> bool:
    return (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def hf_added_tokens(d: Path) -> dict[int, str]:
    """id -> content of the special/added tokens an HF tokenizer directory declares."""
    out: dict[int, str] = {}
    tj = d / "tokenizer.json"
    if tj.is_file():
        for t in _read_json(tj).get("added_tokens", []):
            out[int(t["id"])] = t["content"]
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        for i, t in (_read_json(tc).get("added_tokens_decoder") or {}).items():
            out.setdefault(int(i), t["content"] if isinstance(t, dict) else str(t))
    return out


def copy_hf_tokenizer(src: Path, dst: Path, image_token_id: int | None) -> TokenizerInfo | None:
    """Copy the tokenizer (and processor) files of an HF model directory into ``dst`` and
    write ``copd_tokenizer.json``; None when ``src`` has no tokenizer."""
    if not has_hf_tokenizer(src):
        return None
    dst.mkdir(parents=True, exist_ok=True)
    for name in HF_TOKENIZER_FILES + HF_PROCESSOR_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    image_token = None
    if image_token_id is not None:
        image_token = hf_added_tokens(src).get(image_token_id) or _token_of(src, image_token_id)
    info = {"library": "huggingface", "image_token": image_token}
    (dst / COPD_FILE).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return TokenizerInfo("huggingface", None, None, None, image_token, image_token_id)


def _token_of(d: Path, token_id: int) -> str:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise CheckpointError(f"{d}: transformers cannot load the tokenizer: {e}") from None
    token = tok.convert_ids_to_tokens(token_id)
    if token is None or token_id >= len(tok):
        raise CheckpointError(
            f"{d}: config.json's image_token_id {token_id} is not in the tokenizer's vocabulary"
        )
    return token


def copy_files(src: Path, dst: Path, names: tuple[str, ...]) -> list[str]:
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def tokenizer_library(d: Path) -> str:
    copd = d / COPD_FILE
    if copd.is_file():
        return str(_read_json(copd).get("library"))
    if has_hf_tokenizer(d):
        return "huggingface"
    if (d / SP_MODEL_FILE).is_file() or (d / "tokenizer_metadata.json").is_file():
        return "sentencepiece"
    raise CheckpointError(
        f"{d}: not a tokenizer directory (expected {COPD_FILE}, tokenizer.json or "
        f"{SP_MODEL_FILE})"
    )


def image_token_of(d: Path) -> str | None:
    copd = d / COPD_FILE
    return _read_json(copd).get("image_token") if copd.is_file() else None


def export_tokenizer(src: Path, dst: Path) -> TokenizerInfo:
    """Write tokenizer files transformers' ``AutoTokenizer`` loads into ``dst``; returns the
    special token ids for config.json / generation_config.json."""
    library = tokenizer_library(src)
    image_token = image_token_of(src)
    if library == "huggingface":
        copy_files(src, dst, HF_TOKENIZER_FILES + HF_PROCESSOR_FILES)
        return _hf_info(dst, image_token)
    if library == "sentencepiece":
        from megatron_copd.models.conversion.sp_to_hf import sentencepiece_to_hf

        model_file = src / SP_MODEL_FILE
        if not model_file.is_file():
            models = sorted(src.glob("*.model"))
            if not models:
                raise CheckpointError(f"{src}: SentencePiece tokenizer without a .model file")
            model_file = models[0]
        return sentencepiece_to_hf(model_file, dst, image_token or "<image>")
    raise CheckpointError(f"{src}: tokenizer library {library!r} cannot be exported")


def _hf_info(d: Path, image_token: str | None) -> TokenizerInfo:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise CheckpointError(f"{d}: transformers cannot load the tokenizer: {e}") from None
    image_id = None
    if image_token is not None:
        image_id = tok.convert_tokens_to_ids(image_token)
        if image_id is None or image_id == tok.unk_token_id:
            raise CheckpointError(f"{d}: image token {image_token!r} is not in the vocabulary")
    return TokenizerInfo("huggingface", tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                         image_token, image_id)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
