"""The sbatch scripts against a REAL single-node SLURM (munge + slurmctld + slurmd on localhost).

One job of the 2-branch script runs on 2 tasks through slurm/launch.sh, exactly the path a
cluster run takes. It is preempted with SIGUSR1 to the batch shell while it runs: the trap
forwards the signal to the srun step, both ranks agree to stop and exit with EXIT_REQUEUE, the
launcher requeues the job, and the job runs again with SLURM_RESTART_COUNT=1 and finishes.
`sbatch --wait` follows the job through the requeue and returns the final exit code.

Skipped when SLURM/munge are not installed (.ci/run installs them) or when not root.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from local_slurm import LocalSlurm, missing_binaries

from megatron_copd.runtime.exit_codes import EXIT_REQUEUE

REPO = Path(__file__).resolve().parents[1]

# What every rank runs. `copd selftest` until the training engine exists; then switch to
#   f"{sys.executable} -m megatron_copd.cli train"
# and also assert the run directory's checkpoints/<branch>/latest below.
JOB_COMMAND = f"{sys.executable} -m megatron_copd.cli selftest --hold 8"
JOB_CONFIG = "megatron_copd/configs/toy_copd.yaml"
# sbatch options that shrink the script's cluster-sized request to this machine.
LOCAL_SBATCH = [
    "--nodes=1",
    "--ntasks-per-node=2",
    "--gpus-per-node=0",
    "--cpus-per-task=1",
    "--time=10",
    "--signal=B:USR1@30",
]

SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch")) + sorted((REPO / "slurm").glob("*.sh"))


def _skip_reason() -> str | None:
    missing = missing_binaries()
    if missing:
        return f"SLURM/munge not installed (missing {', '.join(missing)}); .ci/run installs them"
    if os.geteuid() != 0:
        return "the local SLURM test runs slurmd/munged as root"
    return None


@pytest.fixture(scope="module")
def cluster():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    c = LocalSlurm.start()
    try:
        yield c
    finally:
        c.stop()


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.slurm
def test_sbatch_two_branch_job_is_preempted_requeued_and_finishes(cluster, tmp_path):
    sinfo = cluster.run(["sinfo"]).stdout
    print(sinfo)
    assert " idle " in sinfo
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    out = tmp_path / "job-%j.out"
    env = {
        **cluster.env,
        "COPD_HOME": str(REPO),
        "COPD_LOG_DIR": str(log_dir),
        "COPD_TRAIN_CMD": JOB_COMMAND,
        "COPD_CONFIG": JOB_CONFIG,
        "COPD_OVERRIDES": f"run_dir={run_dir}",
        "PYTHONPATH": str(REPO),
        "PYTHONWARNINGS": "ignore",
    }
    t0 = time.monotonic()
    sbatch = subprocess.Popen(
        ["sbatch", "--wait", *LOCAL_SBATCH, f"--output={out}", "slurm/copd_2branch.sbatch"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    job_out = None
    try:
        first = sbatch.stdout.readline()
        m = re.match(r"Submitted batch job (\d+)", first)
        assert m, f"sbatch said: {first}{sbatch.stdout.read()}"
        job = m.group(1)
        job_out = Path(str(out).replace("%j", job))

        def text() -> str:
            return job_out.read_text(errors="replace") if job_out.exists() else ""

        # Preempt once the ranks are up and in their (training-like) loop.
        _wait_for(lambda: "holding" in text() or "error" in text(), 180, "the job to start")
        assert "holding" in text(), text()
        t_signal = time.monotonic()
        cluster.run(["scancel", "--signal=USR1", "--batch", job])
        rc = sbatch.wait(timeout=240)
        t_end = time.monotonic()
    finally:
        if sbatch.poll() is None:
            sbatch.kill()
            sbatch.wait()
            cluster.run(["scancel", job], check=False)
    log = text()
    state = cluster.run(["scontrol", "show", "job", job], check=False).stdout
    print(log)
    print(f"signal at {t_signal - t0:.1f} s, sbatch returned at {t_end - t0:.1f} s")
    context = f"\n--- job output\n{log}\n--- scontrol\n{state}\n--- daemons\n{cluster.logs()}"

    assert rc == 0, f"sbatch --wait returned {rc}{context}"
    # First run: signal forwarded, both ranks stopped with the requeue code, job requeued.
    assert f"job {job} (restart 0)" in log, context
    assert "received SIGUSR1: forwarding" in log, context
    assert "copd selftest: OK, stopped by SIGUSR1 (requeue)" in log, context
    assert f"requeueing job {job}" in log, context
    # Second run: SLURM_RESTART_COUNT=1, not signalled, finished cleanly.
    assert f"job {job} (restart 1)" in log, context
    assert log.rstrip().endswith("step finished with exit code 0"), context
    if state:  # finished jobs are purged after MinJobAge
        assert "Restarts=1" in state, context

    records = [json.loads(line) for line in (run_dir / "selftest.jsonl").read_text().splitlines()]
    assert [r["restart_count"] for r in records] == [0, 1]
    assert [r["preempted_by"] for r in records] == ["SIGUSR1", None]
    for r in records:
        assert r["ok"] and r["launcher"] == "slurm" and r["world_size"] == 2, r
        assert r["slurm_job_id"] == job
        assert {x["branch"] for x in r["ranks"]} == {"text", "image"}
    launch_log = (log_dir / f"copd-2branch-{job}" / "launch.txt").read_text()
    assert launch_log.count("restart=") == 2 and "restart=1" in launch_log


WORKER = """
import os, signal, sys, time
got = []
for s in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(s, lambda n, f: got.append(signal.Signals(n).name))
print("rank", os.environ["SLURM_PROCID"], "up", flush=True)
t0 = time.time()
while not got and time.time() - t0 < 120:
    time.sleep(0.05)
print("rank", os.environ["SLURM_PROCID"], "got", got[0] if got else None, flush=True)
sys.exit(75 if got else 1)
"""


@pytest.mark.slurm
def test_time_limit_signal_reaches_the_ranks_and_requeues_are_capped(cluster, tmp_path):
    """The production path: `--signal=B:USR1@<lead>` before the time limit, no manual scancel.

    With COPD_MAX_REQUEUES=0 the launcher refuses to requeue, so the job ends after one run and
    `sbatch --wait` returns the ranks' requeue code.
    """
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "job.out"
    env = {
        **cluster.env,
        "COPD_HOME": str(REPO),
        "COPD_LOG_DIR": str(tmp_path / "logs"),
        "COPD_TRAIN_CMD": f"{sys.executable} {worker}",
        "COPD_MAX_REQUEUES": "0",
    }
    # A 1-minute limit with the signal 55 s before it: SIGUSR1 comes a few seconds in.
    sbatch = [
        "sbatch", "--wait", *LOCAL_SBATCH[:-2], "--time=1", "--signal=B:USR1@55",
        f"--output={out}", "slurm/copd_2branch.sbatch",
    ]  # fmt: skip
    p = subprocess.run(sbatch, cwd=REPO, env=env, capture_output=True, text=True, timeout=150,
                       check=False)  # fmt: skip
    log = out.read_text() if out.exists() else ""
    print(log)
    assert p.returncode == EXIT_REQUEUE, f"{p.stdout}{p.stderr}\n{log}\n{cluster.logs()}"
    assert "received SIGUSR1: forwarding" in log
    assert "rank 0 got SIGUSR1" in log and "rank 1 got SIGUSR1" in log
    assert "(COPD_MAX_REQUEUES=0); not requeueing" in log


def test_launcher_refuses_to_run_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.run(
        ["bash", str(REPO / "slurm" / "launch.sh"), "true"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert p.returncode == 2
    assert "not inside a SLURM job" in p.stderr


def test_launcher_dry_run_builds_the_srun_command(tmp_path):
    """Container and rank-log settings end up on the srun command line; nothing runs."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text("#!/bin/sh\necho node-a\necho node-b\n")
    (fake_bin / "scontrol").chmod(0o755)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "copd-test",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NTASKS": "16",
        "SLURM_CPUS_PER_TASK": "12",
        "COPD_HOME": str(REPO),
        "COPD_LOG_DIR": str(tmp_path / "logs"),
        "COPD_DRY_RUN": "1",
        "COPD_RANK_LOGS": "1",
        "COPD_CONTAINER_IMAGE": "nvcr.io#nvidia/pytorch:25.01-py3",
        "COPD_SRUN_ARGS": "--cpu-bind=none --mpi=pmix",
    }
    p = subprocess.run(
        ["bash", "slurm/launch.sh", "copd", "train", "cfg.yaml"],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    line = next(x for x in p.stdout.splitlines() if "running: srun" in x)
    assert "master node-a:24242" in p.stdout  # 20000 + 4242 % 20000
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" in line
    assert f"--container-mounts={REPO}:{REPO}" in line
    assert "--output=" in line and "run0-rank%t.log" in line
    assert line.endswith("--cpu-bind=none --mpi=pmix copd train cfg.yaml")
    assert (tmp_path / "logs" / "copd-test-4242" / "launch.txt").exists()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    p = subprocess.run(
        ["shellcheck", "-s", "bash", str(script)], capture_output=True, text=True, check=False
    )
    assert p.returncode == 0, p.stdout
