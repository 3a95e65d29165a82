"""Text math sets with checkable answers -> prompt records (verifier ``math``).

Recognised row layouts (first match wins; ``problem_field`` / ``answer_field`` override):

- Polaris / DeepScaleR / OpenR1-style ``{"problem", "answer"}``;
- GSM8K ``{"question", "answer": "... #### 72"}`` (the number after ``####``);
- MATH / NuminaMath ``{"problem", "solution": "... \\boxed{x} ..."}`` (the last boxed answer);
- DAPO / verl ``{"prompt": [{"role": "user", "content": ...}], "reward_model": {"ground_truth"}}``.

The prompt is the problem followed by ``instruction`` (default: reason step by step and put the
final answer in ``\\boxed{}``) unless the problem already asks for a boxed answer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from megatron_copd.data.real.common import MATH_INSTRUCTION, RecordSink, pick, read_rows
from megatron_copd.errors import DataError
from megatron_copd.rewards.builtin import last_boxed

PROBLEM_FIELDS = ("problem", "question", "prompt", "query", "input")
ANSWER_FIELDS = ("answer", "final_answer", "ground_truth", "target", "solution")
ID_FIELDS = ("id", "idx", "uid", "unique_id", "problem_id")


def math_answer(row: dict, where: str, answer_field: str | None = None) -> str:
    if answer_field is None and isinstance(row.get("reward_model"), dict):
        gt = row["reward_model"].get("ground_truth")
        if gt is not None:
            return str(gt).strip()
    value = pick(row, [answer_field] if answer_field else ANSWER_FIELDS, where, "answer")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field 'answer': expected text or a number, got "
                        f"{type(value).__name__}")
    text = str(value).strip()
    if "####" in text:  # GSM8K: worked solution, then '#### <number>'
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    elif answer_field in (None, "solution") and "\\boxed" in text:
        found = last_boxed(text)
        if found is None:
            raise DataError(f"{where}: field 'answer': unbalanced \\boxed{{...}}")
        text = found
    if not text:
        raise DataError(f"{where}: field 'answer': empty")
    return text


def math_problem(row: dict, where: str, problem_field: str | None = None) -> str:
    value = pick(row, [problem_field] if problem_field else PROBLEM_FIELDS, where, "problem")
    if isinstance(value, list):  # chat messages: the last user turn
        users = [m.get("content") for m in value if isinstance(m, dict) and
                 m.get("role") == "user"]
        value = users[-1] if users else None
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field 'problem': expected non-empty text")
    return value.strip()


def convert_math(
    src: str | os.PathLike,
    output: str | os.PathLike,
    *,
    domain: str = "math",
    instruction: str = MATH_INSTRUCTION,
    problem_field: str | None = None,
    answer_field: str | None = None,
    id_prefix: str | None = None,
    limit: int | None = None,
) -> int:
    """Convert a JSONL/Parquet math set into a prompt-record JSONL; returns the row count."""
    prefix = id_prefix or Path(src).stem
    with RecordSink(output) as sink:
        for i, (where, row) in enumerate(read_rows(src)):
            if limit is not None and i >= limit:
                break
            problem = math_problem(row, where, problem_field)
            prompt = problem if (not instruction or "boxed" in problem) else (
                f"{problem}\n\n{instruction}")
            rid = pick(row, ID_FIELDS, where, "id", required=False)
            extra: dict[str, Any] = {"source": Path(src).name}
            if row.get("level") is not None:
                extra["level"] = row["level"]
            sink.add({"id": f"{prefix}-{rid if rid is not None else i}", "domain": domain,
                      "prompt": prompt, "answer": math_answer(row, where, answer_field),
                      "reward": "math", "meta": extra}, where)
        return sink.close()
