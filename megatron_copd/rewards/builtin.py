"""Built-in verifiers: ``math`` (math-verify), ``choice``, ``exact``, ``numeric``.

Where the answer is looked for in a response (all verifiers): the content of the LAST
``\\boxed{...}`` if there is one; otherwise what follows the last "answer" anchor ("answer:",
"the answer is ..."); otherwise the whole response. "Last" because a model that corrects itself
("Answer: 3. Wait, no. Answer: 5") means its final statement.

The regexes here have no nested or overlapping quantifiers, so they run in linear time on any
input; that is what lets ``exact``, ``choice`` and ``numeric`` run inline in the training
process. ``math`` calls sympy (unbounded time) and runs in the pool's worker processes.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

from megatron_copd.rewards.registry import register_verifier

__all__ = [
    "last_boxed",
    "answer_segment",
    "verify_math",
    "verify_choice",
    "verify_exact",
    "verify_numeric",
    "make_numeric_verifier",
]

_ANCHOR = re.compile(r"\banswer\b(?:\s++is\b)?\s*+[:=]?", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*+")
# Only the last few boxes are tried, so many unclosed "\boxed{" cannot make the scan quadratic.
_MAX_BOXES_TRIED = 4


def last_boxed(text: str) -> str | None:
    """Content of the last well-formed ``\\boxed{...}`` (nested braces allowed), else None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts[-_MAX_BOXES_TRIED:]):
        if start < len(text) and text[start] == "{":
            depth = 0
            for j in range(start, len(text)):
                c = text[j]
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        return text[start + 1 : j]
        else:  # "\boxed 5": one token
            m = re.match(r"[^\s$]+", text[start:])
            if m:
                return m.group(0)
    return None


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def tagged_answer(response: str) -> str:
    """The content of the last ``<answer>...</answer>`` (the R1-style format Video-R1 and
    OneThinker train), else the whole response."""
    found = _ANSWER_TAG.findall(response)
    return found[-1].strip() if found else response


def answer_segment(response: str) -> tuple[str, bool]:
    """(where the final answer is stated, whether it was anchored by \\boxed, "answer" or an
    ``<answer>`` tag)."""
    tagged = tagged_answer(response)
    if tagged is not response:
        return last_boxed(tagged) or tagged, True
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed, True
    last = None
    for last in _ANCHOR.finditer(response):
        pass
    if last is not None:
        rest = response[last.end() :]
        return rest.split("\n", 1)[0] if rest.strip() else rest, True
    return response, False


# --------------------------------------------------------------------------------------------
# math


@lru_cache(maxsize=4096)
def _parse_gold(answer: str):
    from math_verify import parse

    if "$" in answer or "\\boxed" in answer or "\\(" in answer:
        return parse(answer)
    # A bare gold answer ("\frac{1}{2}", "x = 3", "1,000") is read as LaTeX first.
    return parse(f"${answer}$") or parse(answer)


@register_verifier("math")
def verify_math(response: str, answer: str) -> float:
    """Mathematical equivalence with math-verify: \\boxed{\\frac{1}{2}} == 0.5, 1,000 == 1000,
    "x = 3" == 3. Uses signal.alarm internally, so it must run in a process's main thread."""
    from math_verify import parse, verify

    gold = _parse_gold(answer)
    if not gold:
        raise ValueError(f"math: cannot parse the gold answer {answer!r}")
    response = tagged_answer(response)
    boxed = last_boxed(response)
    # Only the final box counts (math-verify would read several boxes as a set).
    pred = parse(f"\\boxed{{{boxed}}}") if boxed is not None else parse(response)
    if not pred:
        return 0.0
    return 1.0 if verify(gold, pred) else 0.0


# --------------------------------------------------------------------------------------------
# multiple choice

_GOLD_CHOICE = re.compile(r"\s*\(?\s*([A-Ja-j])\s*\)?\s*(?:[.:)]|$)")
# After an anchor: "(B)", "B", "b." ... (upper case may be followed by anything but a letter;
# lower case only by punctuation or the end, so "the answer is a triangle" is not "A").
_ANCHORED_CHOICE = re.compile(
    r"\s*+(?:option|choice)?\s*+\(?\s*+(?:([A-J])(?![A-Za-z])|([a-j])(?=\s*+(?:[.,;:!?)\]*]|$)))"
)
# Unanchored: "(B)" anywhere, "B" / "B." / "B)" ending a line, or "B." / "B)" / "B" starting a
# line (a line starting "A cat" is not a choice). Possessive quantifiers keep all of it linear.
_FREE_CHOICE = re.compile(
    r"\(([A-J])\)|(?<![A-Za-z])([A-J])[.)]?[ \t*]*+(?=\n|$)|^[ \t*]*+([A-J])(?:[.):]|[ \t*]*+$)",
    re.MULTILINE,
)


def _gold_letter(answer: str) -> str:
    m = _GOLD_CHOICE.match(answer)
    if not m:
        raise ValueError(f"choice: gold answer {answer!r} is not a choice letter A-J")
    return m.group(1).upper()


def extract_choice(response: str) -> str | None:
    """The final stated choice letter (upper case), or None."""
    response = tagged_answer(response)
    boxed = last_boxed(response)
    if boxed is not None:
        m = _ANCHORED_CHOICE.match(boxed)
        return (m.group(1) or m.group(2)).upper() if m else None
    found = None
    for anchor in _ANCHOR.finditer(response):
        m = _ANCHORED_CHOICE.match(response, anchor.end())
        if m:
            found = (m.group(1) or m.group(2)).upper()
    if found is not None:
        return found
    for m in _FREE_CHOICE.finditer(response.strip()):
        found = m.group(1) or m.group(2) or m.group(3)
    if found is None and len(response.strip()) == 1 and response.strip().upper() in "ABCDEFGHIJ":
        found = response.strip().upper()
    return found


@register_verifier("choice", inline=True)
def verify_choice(response: str, answer: str) -> float:
    """Multiple choice A-J: "(B)", "B.", "answer: b", "\\boxed{C}"; the last stated choice."""
    gold = _gold_letter(answer)
    return 1.0 if extract_choice(response) == gold else 0.0


# --------------------------------------------------------------------------------------------
# exact


_TRAILING = " \t\n.,;:!?。"


def normalize_text(s: str) -> str:
    """Case-folded, whitespace collapsed, surrounding quotes / $ / trailing punctuation removed."""
    s = " ".join(s.split()).casefold()
    s = s.strip(_TRAILING).strip("\"'`$*").strip(_TRAILING)
    return s


@register_verifier("exact", inline=True)
def verify_exact(response: str, answer: str) -> float:
    """Normalised string equality of the final answer segment (or the whole response) and the
    gold (case, whitespace and trailing punctuation ignored)."""
    gold = normalize_text(answer)
    seg, anchored = answer_segment(response)
    if normalize_text(seg) == gold:
        return 1.0
    # An unanchored response: accept its last non-empty line ("...\nblue").
    if not anchored:
        lines = [ln for ln in response.splitlines() if ln.strip()]
        if lines and normalize_text(lines[-1]) == gold:
            return 1.0
    return 0.0


# --------------------------------------------------------------------------------------------
# numeric

_NUMBER = re.compile(
    r"(?<![\w.])[-+−]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
)


def _to_float(text: str) -> float:
    return float(text.replace(",", "").replace("−", "-"))


def last_number(text: str) -> float | None:
    """The last number in ``text`` ("1,000" = 1000, "-2.5", "3e5"), or None."""
    found = None
    for found in _NUMBER.finditer(text):
        pass
    return _to_float(found.group(0)) if found is not None else None


def make_numeric_verifier(rel_tol: float = 1e-6, abs_tol: float = 1e-9):
    """A numeric verifier with other tolerances (register it under your own name)."""

    def verify_numeric(response: str, answer: str) -> float:
        try:
            gold = _to_float(answer.strip())
        except ValueError:
            raise ValueError(f"numeric: gold answer {answer!r} is not a number") from None
        seg, _ = answer_segment(response)
        pred = last_number(seg)
        if pred is None and seg is not response:
            pred = last_number(response)
        if pred is None or not math.isfinite(pred):
            return 0.0
        return 1.0 if math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=abs_tol) else 0.0

    return verify_numeric


verify_numeric = register_verifier("numeric", inline=True)(make_numeric_verifier())
verify_numeric.__doc__ = (
    "Last number of the final answer segment equals the gold within rel_tol=1e-6 (abs 1e-9)."
)
