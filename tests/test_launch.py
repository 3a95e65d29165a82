"""The local launcher (runtime/launch.py) and launcher detection (runtime/distributed.py).

Workers here are small Python scripts (no torch import), so these tests take a few seconds.
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from megatron_copd.runtime import exit_codes
from megatron_copd.runtime.distributed import launch_env
from megatron_copd.runtime.exit_codes import EXIT_REQUEUE
from megatron_copd.runtime.launch import run_workers

REPO = Path(__file__).resolve().parents[1]


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path), str(tmp_path)]


def test_workers_get_rank_env_and_zero_exit(tmp_path):
    cmd = _script(
        tmp_path,
        """
        import json, os, sys
        keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "COPD_LAUNCHER"]
        out = os.path.join(sys.argv[1], "rank%s.json" % os.environ["RANK"])
        json.dump({k: os.environ[k] for k in keys}, open(out, "w"))
        """,
    )
    assert run_workers(cmd, 3, master_port=29123) == 0
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert [s["RANK"] for s in seen] == ["0", "1", "2"]
    assert {s["WORLD_SIZE"] for s in seen} == {"3"}
    assert [s["LOCAL_RANK"] for s in seen] == ["0", "1", "2"]
    assert {s["MASTER_PORT"] for s in seen} == {"29123"}
    assert {s["COPD_LAUNCHER"] for s in seen} == {"local"}


def test_one_failure_stops_the_others_and_its_code_wins(tmp_path):
    cmd = _script(
        tmp_path,
        """
        import os, sys, time
        if os.environ["RANK"] == "1":
            sys.exit(7)
        time.sleep(60)
        """,
    )
    t = time.monotonic()
    assert run_workers(cmd, 3, kill_grace_s=5) == 7
    assert time.monotonic() - t < 10


def test_requeue_code_propagates_and_late_ranks_are_stopped(tmp_path):
    both = _script(tmp_path, f"import sys; sys.exit({EXIT_REQUEUE})")
    assert run_workers(both, 2) == EXIT_REQUEUE
    # A rank that outlives the exit window is stopped and counted as the failure.
    cmd = _script(
        tmp_path,
        """
        import os, sys, time
        if os.environ["RANK"] == "0":
            sys.exit(0)
        time.sleep(60)
        """,
    )
    t = time.monotonic()
    assert run_workers(cmd, 2, exit_wait_s=1, kill_grace_s=5) == 128 + signal.SIGTERM
    assert time.monotonic() - t < 10


LAUNCHER = """
import sys
sys.path.insert(0, {repo!r})
from megatron_copd.runtime.launch import run_workers
sys.exit(run_workers({cmd!r}, 2))
"""


def test_signal_is_forwarded_to_every_worker(tmp_path):
    """SIGUSR1 to the launcher reaches both workers, which 'checkpoint' and ask for a requeue."""
    worker = _script(
        tmp_path,
        f"""
        import os, signal, sys, time
        d = sys.argv[1]
        got = []
        signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
        open(os.path.join(d, "ready%s" % os.environ["RANK"]), "w").close()
        deadline = time.time() + 30
        while not got and time.time() < deadline:
            time.sleep(0.02)
        open(os.path.join(d, "signalled%s" % os.environ["RANK"]), "w").close()
        sys.exit({EXIT_REQUEUE} if got else 1)
        """,
    )
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER.format(repo=str(REPO), cmd=worker)])
    try:
        deadline = time.monotonic() + 20
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.05)
        launcher.send_signal(signal.SIGUSR1)
        assert launcher.wait(timeout=20) == EXIT_REQUEUE
    finally:
        launcher.kill()
        launcher.wait()
    assert (tmp_path / "signalled0").exists() and (tmp_path / "signalled1").exists()


def test_workers_die_with_a_killed_launcher(tmp_path):
    worker = _script(
        tmp_path,
        f"""
        import os, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from megatron_copd.runtime.launch import die_with_launcher
        die_with_launcher()
        open(os.path.join(sys.argv[1], "pid%s" % os.environ["RANK"]), "w").write(str(os.getpid()))
        time.sleep(60)
        """,
    )
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER.format(repo=str(REPO), cmd=worker)])
    try:
        deadline = time.monotonic() + 20
        while not all((tmp_path / f"pid{r}").exists() for r in (0, 1)):
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.05)
        time.sleep(0.1)  # let the pid files be written completely
        pids = [int((tmp_path / f"pid{r}").read_text()) for r in (0, 1)]
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids):
            assert time.monotonic() < deadline, "workers outlived their launcher"
            time.sleep(0.05)
    finally:
        launcher.kill()
        launcher.wait()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_launch_env_reads_srun_steps_but_not_the_batch_script(monkeypatch):
    for k in list(os.environ):
        if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "COPD_LAUNCHER"):
            monkeypatch.delenv(k)
    batch = {"SLURM_JOB_ID": "42", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}
    for k, v in batch.items():
        monkeypatch.setenv(k, v)
    assert launch_env().launcher == "single"  # the batch script: no srun step
    step = {
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "5",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1",
        "MASTER_ADDR": "node7",
        "MASTER_PORT": "23456",
    }
    for k, v in step.items():
        monkeypatch.setenv(k, v)
    env = launch_env()
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("slurm", 5, 8, 1)
    assert (env.master_addr, env.master_port) == ("node7", 23456)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("COPD_LAUNCHER", "local")
    assert (launch_env().launcher, launch_env().rank) == ("local", 2)


def test_exit_code_is_the_same_in_the_slurm_launcher():
    text = (REPO / "slurm" / "launch.sh").read_text()
    m = re.search(r"^EXIT_REQUEUE=(\d+)", text, re.MULTILINE)
    assert m, "slurm/launch.sh must define EXIT_REQUEUE"
    assert int(m.group(1)) == exit_codes.EXIT_REQUEUE


def test_describe_exit_codes():
    assert "requeue" in exit_codes.describe(EXIT_REQUEUE)
    assert exit_codes.describe(128 + signal.SIGKILL) == "killed by SIGKILL"
    assert exit_codes.signal_exit_code(-signal.SIGTERM) == 143
