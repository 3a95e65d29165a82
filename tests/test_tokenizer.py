"""Tokenizer: the toy SentencePiece model through megatron.core.tokenizers, and a Hugging Face
tokenizer directory built offline with the `tokenizers` library."""

import json

import pytest

from megatron_copd.data import tokenizer as tok_mod
from megatron_copd.data.tokenizer import Tokenizer
from megatron_copd.data.toy import build_toy_tokenizer, build_toy_world, vocab
from megatron_copd.errors import DataError

TEXTS = [
    "12 + 3 * 4 - 5 =",
    "Ann has 7 pens. She gets 3 more. How many pens now?",
    "What colour is the biggest shape?",
    "  two  spaces, tabs\tand ünïcode ☃ never seen in training",
    "",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_toy_world(tmp_path_factory.mktemp("toy"), seed=3, train_size=200, eval_size=20)


@pytest.fixture(scope="module")
def tok(world):
    return build_toy_tokenizer(world)


def test_special_ids_and_vocab(tok):
    assert tok.library == "sentencepiece"
    assert 300 <= tok.vocab_size <= 512
    ids = {tok.bos_id, tok.eos_id, tok.pad_id, tok.image_token_id}
    assert len(ids) == 4 and None not in ids
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)


def test_round_trip(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    # BOS/EOS/PAD never show up in decoded text; tensors are accepted.
    import torch

    ids = [tok.bos_id] + tok.encode("7") + [tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(torch.tensor(ids)) == "7"


def test_image_token_is_one_id(tok):
    img = tok.image_token_id
    assert tok.encode("a <image> b").count(img) == 1
    assert tok.encode("<image><image><image>").count(img) == 3
    assert tok.encode("x<image>y").count(img) == 1
    assert img not in tok.encode("< image > <imag e>")
    assert tok.decode(tok.encode("see <image> here")) == "see <image> here"


def test_digits_are_split(tok):
    pieces = [tok.decode([i]) for i in tok.encode("1234") if tok.decode([i]).strip()]
    assert pieces == ["1", "2", "3", "4"]


def test_save_load_and_megatron_metadata(tok, tmp_path):
    from megatron.core.tokenizers import MegatronTokenizer

    tok.save(tmp_path / "t")
    names = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert names == ["copd_tokenizer.json", "tokenizer.model", "tokenizer_metadata.json"]
    meta = json.loads((tmp_path / "t" / "tokenizer_metadata.json").read_text())
    assert meta["library"] == "sentencepiece"
    back = Tokenizer.load(tmp_path / "t")
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text)
    assert back.image_token_id == tok.image_token_id
    # Megatron's own loader reads the directory too (its metadata, our model file).
    raw = MegatronTokenizer.from_pretrained(str(tmp_path / "t" / "tokenizer.model"))
    assert raw.tokenize("12 + 3 =") == tok.encode("12 + 3 =")
    # A megatron-style directory without our info file still loads.
    (tmp_path / "t" / "copd_tokenizer.json").unlink()
    assert Tokenizer.load(tmp_path / "t").encode("How many?") == tok.encode("How many?")


def test_toy_tokenizer_cached_and_deterministic(world, tok, tmp_path, monkeypatch):
    model = (world.root / "tokenizer" / "tokenizer.model").read_bytes()
    other = build_toy_world(tmp_path, seed=3, train_size=200, eval_size=20)
    build_toy_tokenizer(other)
    assert (other.root / "tokenizer" / "tokenizer.model").read_bytes() == model

    def boom(*a, **k):
        raise AssertionError("retrained a cached tokenizer")

    monkeypatch.setattr(vocab, "train_sentencepiece", boom)
    assert build_toy_tokenizer(world).encode("How many?") == tok.encode("How many?")
    with pytest.raises(AssertionError, match="retrained"):
        build_toy_tokenizer(world, vocab_size=400)  # another size is another cache entry


def test_too_small_vocab():
    with pytest.raises(DataError, match="vocab_size: 200 is too small"):
        vocab.train_sentencepiece(["a b c"], vocab_size=200)


def _hf_dir(path, special, image_token="<|image_pad|>", pad="<|endoftext|>"):
    """A tiny byte-level BPE tokenizer saved as a Hugging Face directory (no downloads)."""
    from tokenizers import Tokenizer as Raw
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Raw(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        TEXTS * 20,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    extra = {"additional_special_tokens": [image_token]} if image_token else {}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token=pad, unk_token="<unk>", **extra
    )
    hf.save_pretrained(str(path))
    return path


def test_hugging_face_directory(tmp_path):
    d = _hf_dir(tmp_path / "hf", ["<unk>", "<|endoftext|>", "<|im_end|>", "<|image_pad|>"])
    t = Tokenizer.load(d)
    assert t.library == "huggingface"
    assert t.bos_id is None  # Qwen-style: no BOS
    assert t.image_token == "<|image_pad|>"
    assert t.encode("a <|image_pad|> b").count(t.image_token_id) == 1
    for text in TEXTS[:3]:
        assert t.decode(t.encode(text)) == text
    assert t.decode(t.encode("7") + [t.eos_id, t.pad_id]) == "7"
    assert t.pad_id != t.eos_id
    t.save(tmp_path / "saved")
    back = Tokenizer.load(tmp_path / "saved")
    assert back.encode(TEXTS[1]) == t.encode(TEXTS[1])
    assert back.image_token_id == t.image_token_id


def test_hugging_face_without_pad_or_image_token(tmp_path):
    d = _hf_dir(tmp_path / "hf", ["<unk>", "<|im_end|>"], image_token=None, pad=None)
    t = Tokenizer.load(d)
    assert t.pad_id == t.eos_id  # pads with EOS
    assert t.image_token_id is None
    with pytest.raises(DataError, match="image token '<img>' encodes to .* ids"):
        Tokenizer.load(d, image_token="<img>")


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="tokenizer directory not found"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a tokenizer directory"):
        Tokenizer.load(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / tok_mod.COPD_FILE).write_text('{"library": "tiktoken"}')
    with pytest.raises(DataError, match="library 'tiktoken' is not supported"):
        Tokenizer.load(tmp_path / "odd")
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / tok_mod.COPD_FILE).write_text('{"library": "sentencepiece"}')
    with pytest.raises(DataError, match="SentencePiece tokenizer without tokenizer.model"):
        Tokenizer.load(tmp_path / "sp")
    (tmp_path / "hfbad").mkdir()
    (tmp_path / "hfbad" / "tokenizer.json").write_text("not json")
    with pytest.raises(DataError, match="cannot load Hugging Face tokenizer"):
        Tokenizer.load(tmp_path / "hfbad")
    with pytest.raises(DataError, match="SentencePiece model file not found"):
        Tokenizer.from_sentencepiece(tmp_path / "nope.model")
