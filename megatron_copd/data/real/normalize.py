"""What the published datasets put in their answer and option fields, made uniform.

- answers: ``<answer>B</answer>`` (Video-R1, OneThinker) -> ``B``, a ``<think>...</think>``
  trace before it dropped (MMFineReason); a whole-answer ``\\boxed{x}`` -> ``x``;
- options: a list (``["a cat", "a dog"]``, or already lettered ``["A. a cat", "B. a dog"]``), a
  mapping letter -> text (nulls dropped), one string (We-Math's ``"A. 30°; B. 45°"``, lines of
  ``A. ...``) or a Python-list string (MMMU's ``"['a', 'b']"``): a list of option texts without
  letters, or None when there are none (``[]``, a mapping of nulls, ``"[]"``);
- the gold option's letter from an index, a letter (``B``, ``(B)``, ``B.``, ``B. text``) or the
  option's text (MVBench's ``candidates`` + ``answer``).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from typing import Any

from megatron_copd.data.real.common import LETTERS
from megatron_copd.errors import DataError

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_LETTERED = re.compile(r"^\s*\(?([A-J])\s*[\).:：]\s*(.*)$", re.S)
_SPLIT = re.compile(r"(?:^|[;\n]\s*|\s{2,})(?=\(?[A-J]\s*[\).:：]\s)")
_LETTER_ANSWER = re.compile(r"^\s*\(?([A-J])\s*(?:[\).:：]\s*.*)?$", re.S)


def clean_answer(value: Any) -> str:
    """The gold answer as text, without the wrappers sets put around it."""
    text = _THINK.sub("", str(value)).strip()  # a reasoning trace is not the answer
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        text = tagged[-1].strip()
    if text.startswith("\\boxed{") and text.endswith("}"):
        from megatron_copd.rewards.builtin import last_boxed

        inner = last_boxed(text)
        if inner is not None and f"\\boxed{{{inner}}}" == text:
            text = inner.strip()
    return text


def normalize_options(value: Any, where: str) -> list[str] | None:
    """Option texts in order (letters removed), or None when the row has no options."""
    if value is None:
        return None
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, str):
        value = _parse_option_string(value.strip())
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: str(k).strip().upper())
        value = [value[k] for k in keys]
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: field 'options': expected a list, a mapping or a string of "
                        f"options, got {type(value).__name__}")
    texts = [str(v).strip() for v in value if v is not None and str(v).strip()]
    if not texts:
        return None
    if len(texts) > len(LETTERS):
        raise DataError(f"{where}: field 'options': {len(texts)} options, at most "
                        f"{len(LETTERS)} (A-J)")
    return _strip_letters(texts)


def _parse_option_string(text: str) -> Any:
    if not text:
        return []
    if text[0] in "[{":
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            pass
    parts = [p.strip().rstrip(";") for p in _SPLIT.split(text) if p and p.strip()]
    return parts if len(parts) > 1 else [text]


def _strip_letters(texts: list[str]) -> list[str]:
    """Drop "A. " / "(A) " / "A: " prefixes when the options carry A, B, C... in order."""
    found = [_LETTERED.match(t) for t in texts]
    if all(found) and [m.group(1) for m in found] == list(LETTERS[: len(texts)]):
        return [m.group(2).strip() for m in found]
    return texts


def option_letter(answer: Any, options: Sequence[str], where: str) -> str:
    """The correct option's letter from an index, a letter or the option's text."""
    if isinstance(answer, bool) or answer is None:
        raise DataError(f"{where}: field 'answer': expected an option index, letter or text")
    if isinstance(answer, int):
        if not 0 <= answer < len(options):
            raise DataError(f"{where}: field 'answer': index {answer} outside the "
                            f"{len(options)} options")
        return LETTERS[answer]
    text = clean_answer(answer)
    for i, o in enumerate(options):  # the option's own text first ("B" may be an option)
        if text == o or text.lower() == o.lower():
            return LETTERS[i]
    m = _LETTER_ANSWER.match(text)
    if m and m.group(1) in LETTERS[: len(options)]:
        return m.group(1)
    raise DataError(f"{where}: field 'answer': {text!r} is neither an option letter nor one of "
                    f"the {len(options)} options")


def letter_only(answer: Any) -> str | None:
    """``B`` for an answer that is just a letter (``B``, ``(B)``, ``B.``), else None."""
    m = re.fullmatch(r"\s*\(?([A-J])\)?\.?\s*", clean_answer(answer))
    return m.group(1) if m else None
