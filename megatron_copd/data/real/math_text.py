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

from megatron_copd.data.real.common import (
    MATH_INSTRUCTION,
    ConvertReport,
    RecordSink,
    RowSkip,
    Skips,
    pick,
    read_rows,
)
from megatron_copd.data.real.normalize import clean_answer
from megatron_copd.errors import DataError
from megatron_copd.rewards.builtin import last_boxed

PROBLEM_FIELDS = ("problem", "question", "prompt", "query", "input")
ANSWER_FIELDS = ("answer", "final_answer", "ground_truth", "target", "solution")
ID_FIELDS = ("id", "idx", "uid", "unique_id", "problem_id")  # matched regardless of case


def math_answer(row: dict, where: str, answer_field: str | None = None) -> str:
    if answer_field is None and isinstance(row.get("reward_model"), dict):
        gt = row["reward_model"].get("ground_truth")
        if gt is not None:
            return str(gt).strip()
    value = pick(row, [answer_field] if answer_field else ANSWER_FIELDS, where, "an answer")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowSkip(where, "without an answer", f"field 'answer': expected text or a number, "
                      f"got {type(value).__name__}")
    text = clean_answer(value)
    if "####" in text:  # GSM8K: worked solution, then '#### <number>'
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    elif answer_field in (None, "solution") and "\\boxed" in text:
        found = last_boxed(text)
        if found is None:
            raise RowSkip(where, "with an unbalanced \\boxed{} answer",
                          "field 'answer': unbalanced \\boxed{...}")
        text = found
    if not text:
        raise RowSkip(where, "without an answer", "field 'answer': empty")
    return text


def math_problem(row: dict, where: str, problem_field: str | None = None) -> str:
    value = pick(row, [problem_field] if problem_field else PROBLEM_FIELDS, where, "a problem")
    if isinstance(value, list):  # chat messages: the last user turn
        users = [m.get("content") for m in value if isinstance(m, dict) and
                 m.get("role") == "user"]
        value = users[-1] if users else None
    if not isinstance(value, str) or not value.strip():
        raise RowSkip(where, "without a problem", "field 'problem': expected non-empty text")
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
    strict: bool = False,
) -> ConvertReport:
    """Convert a JSONL/JSON/Parquet math set into a prompt-record JSONL. Rows without a problem
    or an answer are skipped and counted (``strict``: refused)."""
    prefix = id_prefix or Path(src).stem
    skips = Skips(strict)
    with RecordSink(output) as sink:
        for i, (where, row) in enumerate(read_rows(src)):
            if limit is not None and sink.count >= limit:
                break
            try:
                problem = math_problem(row, where, problem_field)
                answer = math_answer(row, where, answer_field)
            except RowSkip as skip:
                skips.add(skip)
                continue
            prompt = problem if (not instruction or "boxed" in problem) else (
                f"{problem}\n\n{instruction}")
            rid = pick(row, ID_FIELDS, where, "id", required=False)
            extra: dict[str, Any] = {"source": Path(src).name}
            level = pick(row, ("level",), where, "level", required=False)
            if level is not None:
                extra["level"] = level
            sink.add({"id": f"{prefix}-{rid if rid is not None else i}", "domain": domain,
                      "prompt": prompt, "answer": answer, "reward": "math", "meta": extra},
                     where)
        if sink.count == 0:
            raise DataError(f"{src}: no records ({skips.count} row(s) skipped: "
                            f"{'; '.join(skips.lines()) or 'the file is empty'})")
        renamed = sink.renamed
        return ConvertReport(sink.close(), {"math": sink.count}, skips, renamed)
