"""A SentencePiece model (the toy tokenizer) -> an HF fast tokenizer directory.

transformers builds the ``tokenizers`` pipeline from the model proto's own settings
(``SpmConverter.build_tokenizer_from_spm_proto``: normaliser spec, dummy prefix, BPE merges ranked
by piece score, byte fallback, user-defined pieces kept whole). SentencePiece's ``split_digits``
is a trainer option that the proto records but that builder does not apply, so a digit splitter
is added here. The image token becomes an added special token, so text around it is encoded
piece by piece as ``data.prompting`` does. The result is checked against SentencePiece itself on
probe texts before it is written: a tokenizer that would encode differently is refused.
"""

from __future__ import annotations

from pathlib import Path

from megatron_copd.errors import CheckpointError
from megatron_copd.models.conversion.hf_tokenizer import TokenizerInfo

PROBES = (
    "What is 12 + 7 * 3? Answer: 33",
    "  two  spaces and\ttabs\nnew lines  ",
    "How many red circles are there? <image> Count them: 1, 2, 3.",
    "<image><image> back to back <image>",
    "unicode: é ß 漢字 🙂 and bytes \x00\x7f",
    "x=-0.5, y=1e3, (a+b)/c; [1/2] \\boxed{42}",
    "",
    " leading space",
)


def sentencepiece_to_hf(model_file: Path, dst: Path, image_token: str | None) -> TokenizerInfo:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter
    from transformers.tokenization_utils_base import AddedToken

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    if proto.trainer_spec.model_type not in (1, 2):  # unigram, bpe
        raise CheckpointError(f"{model_file}: only BPE and unigram SentencePiece models convert")
    if proto.trainer_spec.model_type == 2:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    else:
        vocab = [(p.piece, p.score) for p in proto.pieces]
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if tok is None:
        raise CheckpointError(f"{model_file}: cannot convert this SentencePiece model")
    if proto.trainer_spec.split_digits:
        digits = pre_tokenizers.Split(Regex(r"\d"), behavior="isolated")
        pre = tok.pre_tokenizer
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre, digits]) if pre is not None else digits

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    special = {
        "unk_token": piece(sp.unk_id()),
        "bos_token": piece(sp.bos_id()),
        "eos_token": piece(sp.eos_id()),
        "pad_token": piece(sp.pad_id()),
    }
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        clean_up_tokenization_spaces=False,
        **{k: v for k, v in special.items() if v is not None},
    )
    image_id = None
    if image_token is not None:
        image_id = sp.piece_to_id(image_token)
        if image_id == sp.unk_id() or sp.id_to_piece(image_id) != image_token:
            raise CheckpointError(f"{model_file}: image token {image_token!r} is not a piece")
        # An added (special) token splits the text before normalisation, so every text piece
        # around an image gets its own dummy prefix — exactly how this project encodes prompts
        # (data.prompting encodes each text part separately and inserts image ids between), and
        # what transformers' processors need (they look the token up with encode()).
        hf.add_special_tokens({"additional_special_tokens": [
            AddedToken(image_token, special=True, normalized=False)]})
        if hf.encode(image_token, add_special_tokens=False) != [image_id]:
            raise CheckpointError(f"{model_file}: image token {image_token!r} changed id")
    for text in PROBES:
        want = _encode_parts(sp, text, image_token, image_id)
        got = hf.encode(text, add_special_tokens=False)
        if got != want:
            raise CheckpointError(
                f"{model_file}: the converted tokenizer encodes {text!r} as {got}, "
                f"SentencePiece as {want}; refusing to export a tokenizer that differs"
            )
    hf.save_pretrained(str(dst))
    return TokenizerInfo(
        "sentencepiece",
        _id(sp.bos_id()),
        _id(sp.eos_id()),
        _id(sp.pad_id()),
        image_token,
        image_id,
    )


def _encode_parts(sp, text: str, image_token: str | None, image_id: int | None) -> list[int]:
    """SentencePiece ids of ``text`` with image tokens encoded the project's way: each text part
    on its own, the image token's id between."""
    if image_token is None:
        return sp.encode(text)
    ids: list[int] = []
    for i, part in enumerate(text.split(image_token)):
        if i:
            ids.append(image_id)
        if part:
            ids += sp.encode(part)
    return ids


def _id(i: int) -> int | None:
    return None if i < 0 else int(i)
