"""Text domain of the toy world: short arithmetic problems with small integer answers.

Two surface forms share one difficulty knob, the number of operations (``steps``):
- expressions, ``"12 + 3 * 4 - 5 ="`` (usual precedence: ``*`` before ``+``/``-``);
- word problems, ``"Ann has 7 pens. She gets 3 more. How many pens now?"``.

Answers are integers in ``[0, MAX_ANSWER]`` so a ~1M-parameter model can emit them in two or three
tokens. The mixture of 1..``max_steps`` operations is what gives RL signal after a short warm-up:
one-step items become easy, three-step items stay mostly unsolved.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_ANSWER = 99
MAX_ADD_OPERAND = 20  # operands of + and -
MAX_MUL_OPERAND = 9  # operands of * (keeps products small)

NAMES = ("Ann", "Bob", "Cat", "Dan", "Eve", "Max", "Sam", "Zoe")
ITEMS = ("apples", "pens", "cards", "coins", "books", "stars")


@dataclass(frozen=True)
class TextProblem:
    prompt: str
    answer: int
    steps: int
    kind: str  # "expr" or "word"
    terms: tuple[str, ...]  # the expression in infix tokens, e.g. ("3", "+", "4")


def evaluate(terms: tuple[str, ...] | list[str]) -> int:
    """Evaluate an infix expression of non-negative integers with + - * (usual precedence)."""
    # Collapse products first, then sum the signed terms left to right.
    sums: list[int] = []
    sign = 1
    product = int(terms[0])
    for op, num in zip(terms[1::2], terms[2::2]):
        if op == "*":
            product *= int(num)
        else:
            sums.append(sign * product)
            sign = 1 if op == "+" else -1
            product = int(num)
    sums.append(sign * product)
    return sum(sums)


def _expression(rng: np.random.Generator, steps: int, max_operand: int) -> tuple[str, ...]:
    while True:
        ops = [str(rng.choice(["+", "-", "*"])) for _ in range(steps)]
        nums = []
        for i in range(steps + 1):
            near_mul = (i > 0 and ops[i - 1] == "*") or (i < steps and ops[i] == "*")
            hi = min(MAX_MUL_OPERAND, max_operand) if near_mul else max_operand
            nums.append(str(int(rng.integers(0, hi + 1))))
        terms = [nums[0]]
        for op, n in zip(ops, nums[1:]):
            terms += [op, n]
        if 0 <= evaluate(terms) <= MAX_ANSWER:
            return tuple(terms)


def _word(rng: np.random.Generator, steps: int, max_operand: int) -> tuple[str, tuple[str, ...]]:
    """A story with ``steps`` operations: + and -, optionally a product as the first one."""
    small = min(MAX_MUL_OPERAND, max_operand)
    while True:
        name = str(rng.choice(NAMES))
        item = str(rng.choice(ITEMS))
        pron = "She" if name in ("Ann", "Cat", "Eve", "Zoe") else "He"
        if rng.random() < 0.3:
            a, b = (int(x) for x in rng.integers(2, small + 1, size=2))
            parts = [f"{name} has {a} bags of {b} {item}."]
            terms = [str(a), "*", str(b)]
            changes = steps - 1  # the product is the first operation
        else:
            a = int(rng.integers(1, max_operand + 1))
            parts = [f"{name} has {a} {item}."]
            terms = [str(a)]
            changes = steps
        for _ in range(changes):
            n = int(rng.integers(1, small + 1))
            if rng.random() < 0.5:
                parts.append(f"{pron} gets {n} more.")
                terms += ["+", str(n)]
            else:
                parts.append(f"{pron} loses {n}.")
                terms += ["-", str(n)]
        value = evaluate(terms)
        if 0 <= value <= MAX_ANSWER:
            parts.append(f"How many {item} now?")
            return " ".join(parts), tuple(terms)


def generate(
    rng: np.random.Generator,
    min_steps: int,
    max_steps: int,
    word_frac: float,
    max_operand: int = MAX_ADD_OPERAND,
) -> TextProblem:
    """``max_operand`` (>= 2) bounds every operand; products and story changes stay below 10."""
    steps = int(rng.integers(min_steps, max_steps + 1))
    if rng.random() < word_frac:
        prompt, terms = _word(rng, steps, max_operand)
        kind = "word"
    else:
        terms = _expression(rng, steps, max_operand)
        prompt = " ".join(terms) + " ="
        kind = "expr"
    return TextProblem(prompt=prompt, answer=evaluate(terms), steps=steps, kind=kind, terms=terms)
