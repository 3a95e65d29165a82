"""Kill ``copd train`` at chosen points and resume it: does the run end exactly where an
uninterrupted run ends?

A tiny toy CoPD run (2 branches, 2 cycles of 2 phase-I + 2 phase-II steps, a checkpoint after
every step) is run once without interruption (the reference). Then, for every kill point, a
fresh run directory is trained with ``copd train`` (the local launcher and its 2 worker
processes), the whole process tree is killed when the point is reached, and ``copd train`` is run
again on the same directory (it resumes from ``latest``). Compared with the reference:

- the final checkpoint of every branch, tensor by tensor (model weights, Adam moments, ...) with
  ``torch.equal``, and its non-tensor entries (LR scheduler, iteration, schedule position,
  sampler positions, RNG states);
- metrics.jsonl, record by record, without the timing fields (``time``, ``*_s``,
  ``tokens_per_s``).

Kill points: SIGKILL mid phase I, mid phase II, during a checkpoint save (while an
``iter_<N>.tmp`` directory exists), and a SIGTERM (preemption: every rank finishes the step,
saves, exits with EXIT_REQUEUE = 75), timed from the signal to the launcher's exit.

    PYTHONPATH=. python benchmarks/kill_resume.py [--points phase1 phase2 save sigterm]

``tests/test_kill_resume.py`` runs the same machinery (one kill point in CI).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_copd.checkpoint.ckpt_dirs import (
    TMP_SUFFIX,
    iter_name,
    parse_iter_name,
    read_latest,
    scan_branch_dir,
    verify_files,
)
from megatron_copd.checkpoint.torch_dist_io import TorchDistReader
from megatron_copd.metrics import read_metrics
from megatron_copd.runtime.exit_codes import EXIT_REQUEUE

BRANCHES = ("text", "image")
# 2 cycles x (2 phase-I + 2 phase-II steps): steps 0,1 and 4,5 are phase I, 2,3 and 6,7 phase II.
SCHEDULE = {"cycles": 2, "s_rl": 2, "s_opd": 2}
TOTAL_STEPS = 8
# Timing fields differ between any two runs; everything else in a record must be equal.
_TIMING = re.compile(r"^(time|wall.*|tokens_per_s|.*_s)$")
_TMP_DIR = re.compile(r"^iter_(\d+)" + re.escape(TMP_SUFFIX) + "$")
_RESUMED = re.compile(r"resumed from \S+ \(step (\d+)/(\d+)\)")


def kill_resume_config(base: dict, run_dir: Path, cache_dir: Path) -> dict:
    """The run: ``base`` (a tiny model config such as tests/test_engine.py's TINY) with the
    schedule above, a checkpoint after every step, all checkpoints kept, no evaluation (the
    training state is what is compared). The toy base model gets enough warm-up that phase-I
    rewards are not all zero, so GRPO updates are non-trivial."""
    cfg = json.loads(json.dumps(base))
    cfg["run_dir"] = str(run_dir)
    cfg["data"]["cache_dir"] = str(cache_dir)
    cfg["data"]["base_warmup_steps"] = 150
    cfg["grpo"].update(group_size=4, micro_batch_size=8)
    cfg["schedule"] = dict(SCHEDULE)
    cfg["checkpoint"] = {"interval": 1, "keep_last": 0}
    cfg["eval"] = dict(cfg.get("eval", {}), at_end=False)
    cfg["logging"] = dict(cfg.get("logging", {}), progress=True, tensorboard=False)
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "megatron_copd.cli", "train", str(config)]


def train(config: Path, log: Path, timeout: float = 600.0) -> tuple[int, str]:
    """``copd train CONFIG`` to the end: (exit code, output)."""
    with open(log, "ab") as f:
        proc = subprocess.run(_cmd(config), stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                              env=_env(), timeout=timeout, check=False)
    return proc.returncode, log.read_text(errors="replace")


def start(config: Path, log: Path) -> subprocess.Popen:
    """``copd train CONFIG`` in its own session (the launcher; it starts the worker ranks)."""
    with open(log, "ab") as f:  # the child keeps its own handle
        return subprocess.Popen(_cmd(config), stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                env=_env(), start_new_session=True)


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 60.0) -> None:
    """Send ``sig`` to the launcher's process group and to every descendant (the local launcher
    starts each worker in a process group of its own), then wait until all are gone."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    for p in tree[1:]:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=timeout)
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    if alive:
        raise RuntimeError(f"processes still alive after {signal.Signals(sig).name}: {alive}")


def wait_until(cond: Callable[[], bool], proc: subprocess.Popen, what: str,
               timeout: float = 600.0, poll: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise RuntimeError(f"copd train exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            kill_tree(proc)
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(poll)


# ------------------------------------------------------------------------------- kill points
def latest_from(run_dir: Path, iteration: int) -> Callable[[], bool]:
    """Every branch's ``latest`` names ``iter_<N>`` with ``iteration <= N < TOTAL_STEPS``: steps
    0..N-1 are done, step N is running (a slow poll may see a later N than ``iteration``; the
    table reports the step the run actually resumed from)."""
    def cond() -> bool:
        for b in BRANCHES:
            text = read_latest(run_dir / "checkpoints" / b) or ""
            n = parse_iter_name(text)
            if n is None or not iteration <= n < TOTAL_STEPS:
                return False
        return True

    return cond


def saving(run_dir: Path, at_least: int) -> Callable[[], bool]:
    """A checkpoint of iteration >= ``at_least`` is half written: an ``iter_<N>.tmp`` directory
    already holds a shard file (its index and completion marker come last)."""
    def cond() -> bool:
        return any(int(m.group(1)) >= at_least and any(os.scandir(d))
                   for d, m in _tmp_dirs(run_dir))

    return cond


def metrics_ahead(run_dir: Path, at_least: int) -> Callable[[], bool]:
    """metrics.jsonl already holds step N's records while ``latest`` still names ``iter_<N>``
    (step N done and logged, its checkpoint not yet published), N >= ``at_least``: the resumed
    run must drop those records and log step N again."""
    def cond() -> bool:
        latest = [parse_iter_name(read_latest(run_dir / "checkpoints" / b) or "")
                  for b in BRANCHES]
        if None in latest or len(set(latest)) != 1 or latest[0] < at_least:
            return False
        try:
            text = (run_dir / "metrics.jsonl").read_text()
        except FileNotFoundError:
            return False
        return f'"step": {latest[0]},' in text

    return cond


def _tmp_dirs(run_dir: Path) -> list[tuple[Path, re.Match]]:
    out = []
    for b in BRANCHES:
        try:
            names = os.listdir(run_dir / "checkpoints" / b)
        except FileNotFoundError:
            continue
        for n in names:
            if m := _TMP_DIR.match(n):
                out.append((run_dir / "checkpoints" / b / n, m))
    return out


@dataclass
class KillPoint:
    name: str
    what: str
    condition: Callable[[Path], Callable[[], bool]]
    sig: int = signal.SIGKILL
    checkpoint: dict = field(default_factory=dict)
    """Changes to the run's ``checkpoint`` section (the reference keeps the defaults above)."""


KILL_POINTS = {
    # step 5 (the 2nd phase-I step of cycle 1) is running when iter_5 is published
    "phase1": KillPoint("phase1", "SIGKILL mid phase I (cycle 1, step 5 running)",
                        lambda d: latest_from(d, 5)),
    # step 3 (the 2nd phase-II step of cycle 0) is running when iter_3 is published
    "phase2": KillPoint("phase2", "SIGKILL mid phase II (cycle 0, step 3 running)",
                        lambda d: latest_from(d, 3)),
    "save": KillPoint("save", "SIGKILL during a save (iter_N.tmp half written, N>=4)",
                      lambda d: saving(d, 4)),
    "metrics": KillPoint("metrics", "SIGKILL after step N is logged, before iter_N+1",
                         lambda d: metrics_ahead(d, 4)),
    # async saves: the write of iter_3 may still be in flight (and is lost) at the kill
    "async": KillPoint("async", "SIGKILL mid phase II, async saves (step 3 running)",
                       lambda d: latest_from(d, 3), checkpoint={"async_save": True}),
    "sigterm": KillPoint("sigterm", "SIGTERM after step 2 (preemption)",
                         lambda d: latest_from(d, 2), signal.SIGTERM),
}


# -------------------------------------------------------------------------------- comparison
def _load_object(reader: TorchDistReader, key: str):
    # Our own test checkpoints: the RNG states hold numpy arrays (not weights_only-loadable).
    return torch.load(io.BytesIO(reader.read_bytes(key)), weights_only=False)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def checkpoint_differences(a: Path, b: Path) -> list[str]:
    """Entries of two torch_dist training checkpoints that are not bit-identical ([] = all
    equal): every tensor, and every non-tensor entry (decoded and compared structurally)."""
    ra, rb = TorchDistReader(a), TorchDistReader(b)
    diffs = []
    ka, kb = set(ra.tensor_keys()), set(rb.tensor_keys())
    diffs += [f"only in one: {k}" for k in sorted(ka ^ kb)]
    for k in sorted(ka & kb):
        x, y = ra.read(k), rb.read(k)
        if x.dtype != y.dtype or not torch.equal(x, y):
            diffs.append(f"{k}: max |diff| {float((x.double() - y.double()).abs().max()):.3g}")
    ba, bb = set(ra.bytes_keys()), set(rb.bytes_keys())
    diffs += [f"only in one: {k}" for k in sorted(ba ^ bb)]
    for k in sorted(ba & bb):
        if ra.read_bytes(k) == rb.read_bytes(k):
            continue
        x, y = _load_object(ra, k), _load_object(rb, k)
        if not _same(x, y):
            diffs.append(f"{k}: {str(x)[:200]} != {str(y)[:200]}")
    return diffs


def training_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing fields."""
    return [{k: v for k, v in r.items() if not _TIMING.match(k)}
            for r in read_metrics(run_dir / "metrics.jsonl")]


def metrics_differences(ref: Path, run: Path) -> list[str]:
    a, b = training_records(ref), training_records(run)
    diffs = []
    if len(a) != len(b):
        diffs.append(f"{len(b)} records, the reference has {len(a)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            keys = sorted(k for k in x.keys() | y.keys() if x.get(k) != y.get(k))
            diffs.append(f"record {i} (branch {x.get('branch')}, step {x.get('step')}): "
                         + ", ".join(f"{k} {x.get(k)!r} != {y.get(k)!r}" for k in keys))
    return diffs


# ------------------------------------------------------------------------------------ trials
@dataclass
class Trial:
    point: str
    killed_at: str = ""
    """The checkpoint directories left by the killed run (``.tmp``: an unfinished write)."""
    exit_code: int | None = None
    signal_to_exit_s: float | None = None
    signal_to_checkpoint_s: float | None = None
    """SIGTERM: until every branch's ``latest`` names the preemption checkpoint."""
    saved_on_exit: int | None = None
    """SIGTERM: the iteration ``latest`` names after the exit (a complete checkpoint)."""
    resumed_from: int | None = None
    resume_exit_code: int | None = None
    checkpoint_diffs: dict[str, list[str]] = field(default_factory=dict)
    metrics_diffs: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return (not self.problems and not self.metrics_diffs
                and not any(self.checkpoint_diffs.values()))


def run_reference(base: dict, root: Path, cache_dir: Path) -> Path:
    run_dir = root / "reference"
    config = write_config(kill_resume_config(base, run_dir, cache_dir), root / "reference.yaml")
    code, out = train(config, root / "reference.log")
    if code != 0:
        raise RuntimeError(f"reference run failed ({code}):\n{out[-3000:]}")
    return run_dir


def _latest_all(run_dir: Path) -> list[str | None]:
    return [read_latest(run_dir / "checkpoints" / b) for b in BRANCHES]


def _listing(run_dir: Path) -> str:
    parts = []
    for b in BRANCHES:
        d = run_dir / "checkpoints" / b
        names = sorted(n for n in os.listdir(d) if n.startswith("iter_")) if d.is_dir() else []
        latest = (read_latest(d) or "none").removeprefix("iter_").lstrip("0") or "0"
        listed = ", ".join(n.removeprefix("iter_").lstrip("0") for n in names)
        parts.append(f"{b}: latest {latest}, iter [{listed}]")
    return "; ".join(parts)


def run_trial(point: KillPoint, base: dict, root: Path, cache_dir: Path, ref: Path) -> Trial:
    trial = Trial(point.name)
    run_dir = root / point.name
    cfg = kill_resume_config(base, run_dir, cache_dir)
    cfg["checkpoint"].update(point.checkpoint)
    config = write_config(cfg, root / f"{point.name}.yaml")
    log = root / f"{point.name}.log"
    proc = start(config, log)
    try:
        wait_until(point.condition(run_dir), proc, point.what)
    except RuntimeError as e:  # e.g. the run finished before a save was caught half-written
        trial.problems.append(str(e))
        return trial
    except BaseException:
        if proc.poll() is None:
            kill_tree(proc)
        raise
    sent = time.monotonic()
    if point.sig == signal.SIGKILL:
        kill_tree(proc, signal.SIGKILL)
        trial.killed_at = _listing(run_dir)
        trial.exit_code = proc.returncode
    else:
        before = _latest_all(run_dir)
        os.killpg(proc.pid, point.sig)  # the launcher; it forwards the signal to its workers
        while proc.poll() is None:
            if trial.signal_to_checkpoint_s is None and _latest_all(run_dir) != before:
                trial.signal_to_checkpoint_s = time.monotonic() - sent
            if time.monotonic() - sent > 600:
                kill_tree(proc)
            time.sleep(0.002)
        trial.exit_code = proc.returncode
        trial.signal_to_exit_s = time.monotonic() - sent
        trial.killed_at = _listing(run_dir)
        _check_preemption_exit(trial, run_dir)
    if point.name == "save" and not _tmp_dirs(run_dir):
        trial.problems.append("the kill did not land during a save (no .tmp directory left)")

    code, out = train(config, root / f"{point.name}-resume.log")
    trial.resume_exit_code = code
    if code != 0:
        trial.problems.append(f"resumed run failed ({code}): {out[-2000:]}")
        return trial
    resumed = _RESUMED.findall(out)
    trial.resumed_from = int(resumed[-1][0]) if resumed else 0
    final = iter_name(TOTAL_STEPS)
    for b in BRANCHES:
        trial.checkpoint_diffs[b] = checkpoint_differences(
            ref / "checkpoints" / b / final, run_dir / "checkpoints" / b / final
        )
    trial.metrics_diffs = metrics_differences(ref, run_dir)
    return trial


def _check_preemption_exit(trial: Trial, run_dir: Path) -> None:
    if trial.exit_code != EXIT_REQUEUE:
        trial.problems.append(f"exit code {trial.exit_code} after SIGTERM, want {EXIT_REQUEUE}")
    saved = set()
    for b in BRANCHES:
        scan = scan_branch_dir(run_dir / "checkpoints" / b)
        if scan.latest is None or scan.incomplete:
            trial.problems.append(f"{b}: no valid latest checkpoint after SIGTERM "
                                  f"({scan.latest_problem or scan.report()})")
            continue
        verify_files(scan.complete[scan.latest])
        saved.add(scan.latest)
    if len(saved) == 1:
        trial.saved_on_exit = saved.pop()
    else:
        trial.problems.append(f"branches stopped at different iterations: {sorted(saved)}")


def where(step: int) -> str:
    """``(c<cycle> p<phase>)`` of a 0-based step of SCHEDULE."""
    period = SCHEDULE["s_rl"] + SCHEDULE["s_opd"]
    cycle, within = divmod(step, period)
    return f"(c{cycle} p{1 if within < SCHEDULE['s_rl'] else 2})"


def print_table(trials: list[Trial]) -> None:
    head = (f"{'kill point':<54} {'resumed from':>18} {'bit-identical':>13} "
            f"{'signal->ckpt':>12} {'signal->exit':>12}")
    print(head)
    print("-" * len(head))
    for t in trials:
        point = KILL_POINTS[t.point].what
        resumed = "-" if t.resumed_from is None else f"step {t.resumed_from} {where(t.resumed_from)}"
        same = "yes" if t.identical else "NO"
        ckpt = "-" if t.signal_to_checkpoint_s is None else f"{t.signal_to_checkpoint_s:.2f}s"
        secs = "-" if t.signal_to_exit_s is None else f"{t.signal_to_exit_s:.2f}s"
        print(f"{point:<54} {resumed:>18} {same:>13} {ckpt:>12} {secs:>12}")
    for t in trials:
        print(f"\n{t.point}: exit code {t.exit_code}; checkpoints left: {t.killed_at}")
        for p in t.problems:
            print(f"  problem: {p}")
        for b, diffs in t.checkpoint_diffs.items():
            for d in diffs[:10]:
                print(f"  {b} checkpoint: {d}")
        for d in t.metrics_diffs[:10]:
            print(f"  metrics: {d}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", nargs="+", choices=list(KILL_POINTS),
                        default=list(KILL_POINTS))
    parser.add_argument("--work-dir", help="keep the runs here (default: a temporary dir)")
    parser.add_argument("--reuse-reference", action="store_true",
                        help="use the finished reference run already in --work-dir")
    parser.add_argument("--cache-dir", help="toy world + base model cache (default: in work dir)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "tests"))
    from test_engine import TINY

    with tempfile.TemporaryDirectory(prefix="kill_resume_") as tmp:
        root = Path(args.work_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        cache = Path(args.cache_dir) if args.cache_dir else root / "cache"
        t0 = time.perf_counter()
        ref = root / "reference"
        final = [ref / "checkpoints" / b / iter_name(TOTAL_STEPS) for b in BRANCHES]
        if not (args.reuse_reference and all(p.is_dir() for p in final)):
            ref = run_reference(TINY, root, cache)
        print(f"reference run: {time.perf_counter() - t0:.1f}s ({TOTAL_STEPS} steps, "
              f"schedule {SCHEDULE}, checkpoint every step)\n", flush=True)
        trials = []
        for name in args.points:
            t0 = time.perf_counter()
            trials.append(run_trial(KILL_POINTS[name], TINY, root, cache, ref))
            print(f"{name}: {time.perf_counter() - t0:.1f}s", flush=True)
        print()
        print_table(trials)
    return 0 if all(t.identical for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
