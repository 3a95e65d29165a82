"""Run metrics: ``run_dir/metrics.jsonl`` (one JSON object per line) and TensorBoard scalars.

Record schema
-------------
Every record is a flat JSON object. Identity keys name what it is about; every other numeric
key is a metric. ``time`` (unix seconds) is added when missing; NaN/inf are written as null.

* Branch record (``kind: "branch"``, the default when ``branch`` is present) - one per branch
  per optimizer step::

      {"branch": "text", "cycle": 0, "phase": 1, "step": 12,
       "reward_mean": 0.41, "loss": 0.12, "grad_norm": 0.9, "tokens_per_s": 5400.0, ...}

  ``step`` is the branch's global optimizer step (monotone across cycles, phases and resumes);
  ``phase`` is 1 (GRPO on the branch's own data) or 2 (GRPO + on-policy distillation). Optional
  metrics: accuracy, reward_std, entropy, lr, kl, response_len, ... In phase II with a single
  teacher the record also carries ``teacher`` plus the edge metrics ``opd_advantage_mean``,
  ``overlap_top10``, ``sym_kl``.
* Edge record (``kind: "edge"``, the default when ``student`` and ``teacher`` are present) -
  one per directed distillation edge per step (several teachers, or overlap probes in phase I)::

      {"student": "text", "teacher": "image", "cycle": 1, "phase": 2, "step": 14,
       "overlap_top10": 0.87, "sym_kl": 0.31, "opd_advantage_mean": -0.05}

  ``step`` is the student's step.
* Eval record (``kind: "eval"``): ``model`` (a branch name, ``base`` or ``merged``), ``domain``,
  ``accuracy``, ``step``.

TensorBoard tags (under ``run_dir/tb``): ``branch/<branch>/<metric>``,
``edge/<student>-><teacher>/<metric>`` (a branch record's edge metrics go to its edge), and
``eval/<model>/<domain>/accuracy``; the x axis is ``step``.

One writer per run: create it on global rank 0 only and send it the other branches' records
(two processes appending to one file on a network file system can interleave lines).

Resume: ``MetricsWriter(run_dir, resume_steps={"text": 40, "image": 40})`` drops the records
written after the checkpoint being resumed (and a torn last line from a crash) before appending,
and purges the same steps from TensorBoard, so the resumed run's metrics continue seamlessly.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Self, TextIO

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
IDENTITY_KEYS = ("kind", "branch", "student", "teacher", "model", "domain", "cycle", "step", "time")
EDGE_METRICS = ("opd_advantage_mean", "overlap_top10", "sym_kl", "teacher_logp_mean", "opd_tokens")


def record_kind(record: dict[str, Any]) -> str:
    kind = record.get("kind")
    if kind:
        return str(kind)
    if "student" in record and "teacher" in record:
        return "edge"
    if "branch" in record:
        return "branch"
    if "model" in record and "domain" in record:
        return "eval"
    raise ValueError(
        f"metrics record {record!r}: expected a 'branch', 'student'+'teacher' or "
        "'model'+'domain' key"
    )


def _clean(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a metrics.jsonl (a torn last line from a crash is skipped)."""
    records, _ = _read(Path(path))
    return records


def _read(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """(records, file_needs_rewrite). Malformed lines other than a torn last one are errors."""
    if not path.exists():
        return [], False
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    torn = lines[-1] != ""  # the last write did not finish its newline
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue  # torn by a crash mid-write
            raise ValueError(f"{path}:{i + 1}: not a JSON object") from None
    return records, torn


def _step_key(record: dict[str, Any]) -> tuple[str | None, int | None]:
    try:
        kind = record_kind(record)
    except ValueError:
        kind = "unknown"
    who = record.get("student") if kind == "edge" else record.get("branch") or record.get("model")
    step = record.get("step")
    return who, step if isinstance(step, int) else None


class MetricsWriter:
    """Appends records to ``run_dir/metrics.jsonl`` and mirrors numeric fields to TensorBoard."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        tensorboard: bool = True,
        resume_steps: dict[str, int] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._truncate(resume_steps)
        # Kept open for the whole run (one flush per record); closed by close() / __exit__.
        self._file: TextIO | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = min(resume_steps.values()) + 1 if resume_steps else None
            self._tb = SummaryWriter(log_dir=str(self.run_dir / TB_DIR), purge_step=purge)

    def _truncate(self, resume_steps: dict[str, int] | None) -> None:
        records, torn = _read(self.path)
        if not records and not torn:
            return
        keep = records
        if resume_steps is not None:
            last = max(resume_steps.values(), default=0)
            keep = []
            for r in records:
                who, step = _step_key(r)
                limit = resume_steps.get(who, last) if who is not None else last
                if step is None or step <= limit:
                    keep.append(r)
        if torn or len(keep) != len(records):
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for r in keep:
                    f.write(json.dumps(r, allow_nan=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise RuntimeError("MetricsWriter is closed")
        kind = record_kind(record)
        rec = {k: _clean(v) for k, v in record.items()}
        rec.setdefault("time", time.time())
        if not isinstance(rec.get("step"), int):
            raise TypeError(f"metrics record {record!r}: 'step' must be an integer")
        self._file.write(json.dumps(rec, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for tag, value in tensorboard_scalars(rec, kind):
                self._tb.add_scalar(tag, value, rec["step"], walltime=rec["time"])

    def log_many(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            self.log(r)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is None:
            return
        self.flush()
        self._file.close()
        self._file = None
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tensorboard_scalars(rec: dict[str, Any], kind: str | None = None) -> list[tuple[str, float]]:
    """The (tag, value) pairs a record becomes in TensorBoard."""
    kind = kind or record_kind(rec)
    out = []
    numeric = {
        k: float(v)
        for k, v in rec.items()
        if k not in IDENTITY_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    phase = _phase_number(rec.get("phase"))
    if phase is not None:
        numeric["phase"] = phase
    if kind == "edge":
        prefix = f"edge/{rec['student']}->{rec['teacher']}"
        out += [(f"{prefix}/{k}", v) for k, v in numeric.items()]
    elif kind == "eval":
        if "accuracy" in numeric:
            out.append((f"eval/{rec['model']}/{rec['domain']}/accuracy", numeric["accuracy"]))
    else:
        branch, teacher = rec["branch"], rec.get("teacher")
        for k, v in numeric.items():
            if teacher and k in EDGE_METRICS:
                out.append((f"edge/{branch}->{teacher}/{k}", v))
            else:
                out.append((f"branch/{branch}/{k}", v))
    return out


def _phase_number(phase: Any) -> float | None:
    if isinstance(phase, bool) or phase is None:
        return None
    if isinstance(phase, (int, float)):
        return float(phase)
    return {"I": 1.0, "II": 2.0, "rl": 1.0, "opd": 2.0}.get(str(phase))


# ---------------------------------------------------------------------------------------------


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Progress:
    """Console progress with ETA, for rank 0 (``enabled=False`` elsewhere).

    A tqdm bar when the stream is a terminal, one plain line per ``update`` otherwise (cluster
    logs). ``start_step`` is the step a resumed run starts from, so the ETA is based on this
    run's own pace.

        progress = Progress(total_steps, start_step=resumed_step, enabled=rank == 0)
        progress.update(step, cycle=1, phase="II", text={"reward": 0.4}, image={"reward": 0.3})
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        use_tqdm: bool | None = None,
        desc: str = "copd",
        clock=time.monotonic,
    ) -> None:
        self.total = total_steps
        self.start_step = start_step
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.desc = desc
        self._clock = clock
        self._t0 = clock()
        self._bar = None
        if use_tqdm is None:
            use_tqdm = hasattr(self.stream, "isatty") and self.stream.isatty()
        if enabled and use_tqdm:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc=desc,
                file=self.stream,
                dynamic_ncols=True,
            )

    def eta_seconds(self, step: int) -> float | None:
        done = step - self.start_step
        if done <= 0:
            return None
        rate = (self._clock() - self._t0) / done
        return rate * max(0, self.total - step)

    def line(self, step: int, **fields: Any) -> str:
        elapsed = self._clock() - self._t0
        done = step - self.start_step
        pct = 100.0 * step / self.total if self.total else 100.0
        parts = [f"[{self.desc}] step {step}/{self.total} ({pct:.0f}%)"]
        flat, groups = [], []
        for k, v in fields.items():
            if isinstance(v, dict):
                groups.append(f"{k}: " + " ".join(f"{a}={_fmt_value(b)}" for a, b in v.items()))
            else:
                flat.append(f"{k} {_fmt_value(v)}")
        if flat:
            parts.append(" ".join(flat))
        parts += groups
        if done > 0:
            parts.append(f"{elapsed / done:.2f} s/step")
        parts.append(f"elapsed {_fmt_duration(elapsed)}")
        eta = self.eta_seconds(step)
        parts.append(f"ETA {_fmt_duration(eta)}" if eta is not None else "ETA ?")
        return " | ".join(parts)

    def update(self, step: int, **fields: Any) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = step
            post = {k: _fmt_value(v) for k, v in fields.items() if not isinstance(v, dict)}
            for k, v in fields.items():
                if isinstance(v, dict):
                    post[k] = " ".join(f"{a}={_fmt_value(b)}" for a, b in v.items())
            self._bar.set_postfix(post, refresh=False)
            self._bar.refresh()
            return
        print(self.line(step, **fields), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
