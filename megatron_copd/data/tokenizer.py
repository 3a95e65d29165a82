"""One tokenizer interface for the project, backed by ``megatron.core.tokenizers``.

Two kinds of directory load through :meth:`Tokenizer.load`:

- SentencePiece (the toy tokenizer): ``tokenizer.model`` + megatron's ``tokenizer_metadata.json``;
- Hugging Face (Qwen3, Llama, ...): ``tokenizer.json`` / ``tokenizer_config.json``; loaded with
  megatron's ``huggingface`` library (``transformers.AutoTokenizer``; local files only).

``copd_tokenizer.json`` (written by :meth:`Tokenizer.save`) records the library and the image
placeholder token. ``encode`` never adds BOS/EOS (prompt encoding adds BOS itself), and
``decode`` drops BOS/EOS/PAD ids so a sampled response decodes to just its text.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from megatron_copd.errors import DataError

COPD_FILE = "copd_tokenizer.json"
SP_MODEL_FILE = "tokenizer.model"
DEFAULT_IMAGE_TOKEN = "<image>"
# Placeholder tokens of common VLM tokenizers, tried in order when none is configured.
_IMAGE_TOKEN_CANDIDATES = ("<image>", "<|image_pad|>")
_HF_FILES = ("tokenizer.json", "tokenizer_config.json")


class Tokenizer:
    """Text <-> token ids, special ids, and the single-id image placeholder token."""

    def __init__(self, backend, library: str, image_token: str | None) -> None:
        """Use :meth:`load` or :meth:`from_sentencepiece` rather than calling this directly."""
        self.backend = backend  # a megatron.core.tokenizers MegatronTokenizerText
        self.library = library
        self.image_token = image_token
        self.image_token_id: int | None = None
        if image_token is not None:
            self.image_token_id = self._single_id(image_token)
        eos = backend.eos_id
        if eos is None:
            raise DataError(f"tokenizer {backend.path}: no end-of-sequence token")
        self.eos_id: int = int(eos)
        bos = backend.bos_id
        self.bos_id: int | None = None if bos is None or bos < 0 else int(bos)
        pad = backend.pad_id
        # Padding is always masked out; tokenizers without a pad token pad with EOS.
        self.pad_id: int = self.eos_id if pad is None or pad < 0 else int(pad)
        self._strip = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}

    # -- core API ------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self.backend.vocab_size)

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.backend.tokenize(text)]

    def decode(self, ids) -> str:
        """Text of ``ids`` without BOS/EOS/PAD (image placeholders decode to the token text)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        kept = [int(i) for i in ids if int(i) not in self._strip]
        if self.library == "huggingface":
            return self.backend.detokenize(kept, skip_special_tokens=False)
        return self.backend.detokenize(kept)

    def _single_id(self, token: str) -> int:
        ids = self.special_ids(token)
        if len(ids) != 1:
            raise DataError(
                f"tokenizer {self.backend.path}: image token {token!r} encodes to {len(ids)} "
                f"ids; it must be a single special token of the vocabulary"
            )
        return int(ids[0])

    def special_ids(self, token: str) -> list[int]:
        """Ids of a special token's text (SentencePiece's word-boundary piece left out): one id
        when the vocabulary has it as a token."""
        return [i for i in self.encode(token) if i != self._space_id()]

    def _space_id(self) -> int | None:
        # SentencePiece prefixes every text with a word-boundary piece; ignore it when checking
        # that the image token is one id.
        if self.library != "sentencepiece":
            return None
        sp = self.backend._tokenizer.tokenizer
        return sp.piece_to_id("\u2581")

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_sentencepiece(
        cls, model_file: str | os.PathLike, image_token: str | None = DEFAULT_IMAGE_TOKEN
    ) -> Tokenizer:
        """Wrap a SentencePiece ``.model`` file (megatron metadata is passed inline)."""
        from megatron.core.tokenizers import MegatronTokenizer

        path = Path(model_file)
        if not path.is_file():
            raise DataError(f"{path}: SentencePiece model file not found")
        backend = MegatronTokenizer.from_pretrained(
            tokenizer_path=str(path), metadata_path={"library": "sentencepiece"}
        )
        return cls(backend, "sentencepiece", image_token)

    @classmethod
    def load(cls, path: str | os.PathLike, image_token: str | None = None) -> Tokenizer:
        """Load a tokenizer directory (see the module docstring for the kinds understood).

        ``image_token`` overrides the stored/detected placeholder token.
        """
        from megatron.core.tokenizers import MegatronTokenizer

        d = Path(path).expanduser()
        if not d.is_dir():
            raise DataError(f"{d}: tokenizer directory not found")
        info = _read_info(d)
        library = info.get("library")
        if image_token is None:
            image_token = info.get("image_token")
        if library == "sentencepiece":
            model = d / info.get("model_file", SP_MODEL_FILE)
            if not model.is_file():
                raise DataError(f"{d}: SentencePiece tokenizer without {model.name}")
            backend = MegatronTokenizer.from_pretrained(tokenizer_path=str(model))
            return cls(backend, library, image_token or DEFAULT_IMAGE_TOKEN)
        if library == "huggingface":
            try:
                backend = MegatronTokenizer.from_pretrained(
                    tokenizer_path=str(d),
                    metadata_path={"library": "huggingface"},
                    include_special_tokens=False,
                )
            except (ValueError, OSError) as e:
                raise DataError(f"{d}: cannot load Hugging Face tokenizer: {e}") from None
            if image_token is None:
                vocab = backend._tokenizer.tokenizer.get_vocab()
                image_token = next((t for t in _IMAGE_TOKEN_CANDIDATES if t in vocab), None)
            return cls(backend, library, image_token)
        raise DataError(
            f"{d}: tokenizer library {library!r} is not supported; expected "
            f"'sentencepiece' or 'huggingface'"
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write a directory :meth:`load` reads back (files replaced atomically one by one)."""
        from megatron.core.tokenizers import MegatronTokenizer

        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        info: dict = {"library": self.library, "image_token": self.image_token}
        if self.library == "sentencepiece":
            _copy_atomic(Path(self.backend.path), d / SP_MODEL_FILE)
            tmp_meta = d / ".tokenizer_metadata.json.tmp"
            tmp_meta.unlink(missing_ok=True)
            MegatronTokenizer.write_metadata(
                tokenizer_path=str(d / SP_MODEL_FILE),
                tokenizer_library="sentencepiece",
                metadata_path=str(tmp_meta),
            )
            os.replace(tmp_meta, d / "tokenizer_metadata.json")
            info["model_file"] = SP_MODEL_FILE
        else:
            self.backend.save_pretrained(str(d))
        _write_atomic(d / COPD_FILE, json.dumps(info, indent=1, sort_keys=True) + "\n")
        return d

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.library}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
            f"eos={self.eos_id}, pad={self.pad_id}, image={self.image_token_id})"
        )


def _read_info(d: Path) -> dict:
    copd = d / COPD_FILE
    if copd.is_file():
        try:
            return json.loads(copd.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{copd}: invalid JSON: {e}") from None
    meta = d / "tokenizer_metadata.json"
    if meta.is_file():  # a directory prepared with megatron's write_metadata
        info = json.loads(meta.read_text())
        if info.get("library") == "sentencepiece":
            models = sorted(d.glob("*.model"))
            if not models:
                raise DataError(f"{d}: SentencePiece metadata but no .model file")
            info["model_file"] = models[0].name
        return info
    if any((d / f).is_file() for f in _HF_FILES):
        return {"library": "huggingface"}
    raise DataError(
        f"{d}: not a tokenizer directory (expected {COPD_FILE}, "
        f"tokenizer_metadata.json or Hugging Face tokenizer files)"
    )


def _copy_atomic(src: Path, dst: Path) -> None:
    if src.resolve() == dst.resolve():
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _write_atomic(dst: Path, text: str) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, dst)
