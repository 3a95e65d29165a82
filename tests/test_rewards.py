"""Verifiers on tricky answers; the reward pool's time limits, errors, crashes and plugins."""

import os
import time

import pytest

from megatron_copd.errors import UserError
from megatron_copd.rewards import (
    RewardPool,
    RewardPoolError,
    UnknownVerifierError,
    available_verifiers,
    get_verifier,
    make_numeric_verifier,
    register_verifier,
    verify_choice,
    verify_exact,
    verify_math,
    verify_numeric,
)
from megatron_copd.rewards.builtin import extract_choice, last_boxed

PLUGINS = ["_reward_plugins"]


@pytest.mark.parametrize(
    "response,answer,expected",
    [
        (r"So the result is $\boxed{\frac{1}{2}}$.", "0.5", 1.0),
        ("The answer is 0.5", r"\frac{1}{2}", 1.0),
        (r"\boxed{1/2}", "0.5", 1.0),
        ("Answer: 1,000", "1000", 1.0),
        ("The answer is 1000.", "1,000", 1.0),
        ("Solving, x = 3", "3", 1.0),
        ("Answer: 3", "x = 3", 1.0),
        (r"\boxed{\sqrt{2}}", r"\sqrt{2}", 1.0),
        ("7 + 5 = 12, so the answer is 12", "12", 1.0),
        ("Answer: 3. Wait, no. Answer: 5", "5", 1.0),  # the final statement counts
        ("Answer: 3. Wait, no. Answer: 5", "3", 0.0),
        (r"\boxed{4}. Actually the answer is 3", "4", 1.0),  # \boxed wins over "answer"
        (r"first \boxed{7}, finally \boxed{8}", "8", 1.0),  # the last box, not the set {7, 8}
        (r"first \boxed{7}, finally \boxed{8}", "7", 0.0),
        ("I have no idea", "2", 0.0),
        ("", "2", 0.0),
        ("Answer: -4", "-4", 1.0),
        ("Answer: 4", "-4", 0.0),
    ],
)
def test_math_verifier_tricky_answers(response, answer, expected):
    assert verify_math(response, answer) == expected


def test_math_verifier_unparsable_gold_raises():
    with pytest.raises(ValueError, match="cannot parse the gold answer"):
        verify_math(r"\boxed{1}", "")


def test_last_boxed_nesting_and_malformed():
    assert last_boxed(r"\boxed{\frac{1}{2}} then \boxed{x^{2}}") == "x^{2}"
    assert last_boxed(r"\boxed{3} and an unclosed \boxed{4") == "3"
    assert last_boxed(r"\boxed 5 apples") == "5"
    assert last_boxed("no box") is None


@pytest.mark.parametrize(
    "response,expected",
    [
        ("The answer is (B).", "B"),
        ("B.", "B"),
        ("answer: b", "B"),
        ("Answer: B because it fits", "B"),
        ("The answer is: option C", "C"),
        (r"\boxed{D}", "D"),
        ("I first thought (A) but the answer is (C)", "C"),  # the final stated choice
        ("Options:\nA. 1\nB. 2\nSo I pick C", "C"),
        ("A cat sat on a mat, so (J)", "J"),
        ("the answer is a triangle", None),  # lower-case article, not a choice
        ("A cat sat on the mat.", None),
        ("nothing here", None),
        ("e", "E"),
    ],
)
def test_choice_extraction(response, expected):
    assert extract_choice(response) == expected


def test_choice_verifier_and_gold_forms():
    assert verify_choice("answer: b", "B") == 1.0
    assert verify_choice("The answer is (B).", "(b)") == 1.0
    assert verify_choice("The answer is (B).", "C") == 0.0
    with pytest.raises(ValueError, match="not a choice letter A-J"):
        verify_choice("(B)", "K")
    with pytest.raises(ValueError, match="not a choice letter"):
        verify_choice("(B)", "forty")


def test_exact_verifier_normalisation():
    assert verify_exact("  Blue.  ", "blue") == 1.0
    assert verify_exact("The answer is   Dark  Blue!", "dark blue") == 1.0
    assert verify_exact("Let me think.\nred", "Red") == 1.0  # the last line of free text
    assert verify_exact(r"so \boxed{Paris}", "paris") == 1.0
    assert verify_exact("I think blue", "blue") == 0.0
    assert verify_exact("The answer is blue", "blue green") == 0.0


def test_numeric_verifier_last_number_and_tolerance():
    assert verify_numeric("There are 1,000 of them", "1000") == 1.0
    assert verify_numeric("3 apples and then 7", "7") == 1.0
    assert verify_numeric("3 apples and then 7", "3") == 0.0
    assert verify_numeric("Answer: 2.5000001", "2.5") == 1.0  # within rel 1e-6
    assert verify_numeric("Answer: 2.51", "2.5") == 0.0
    assert verify_numeric("x = -4", "-4") == 1.0
    assert verify_numeric("Answer: 0", "0") == 1.0
    assert verify_numeric("Answer: none", "0") == 0.0
    assert verify_numeric(r"\boxed{42}, though 41 was close", "42") == 1.0
    loose = make_numeric_verifier(rel_tol=0.01)
    assert loose("Answer: 2.51", "2.5") == 1.0
    with pytest.raises(ValueError, match="not a number"):
        verify_numeric("3", "three")


def test_builtin_regexes_stay_fast_on_adversarial_text():
    nasty = [
        "answer" + " " * 50000 + "x",
        "\\boxed{" * 20000,
        "(" * 60000,
        "A" + " \t" * 30000 + "z",
        "1" * 60000 + ",",
    ]
    t0 = time.perf_counter()
    for text in nasty:
        verify_choice(text, "B")
        verify_exact(text, "b")
        verify_numeric(text, "1")
    # Linear-time regexes: well under a second; a quadratic one would take minutes.
    assert time.perf_counter() - t0 < 5.0


def test_registry():
    assert {"math", "choice", "exact", "numeric"} <= set(available_verifiers())
    assert get_verifier("exact") is verify_exact
    with pytest.raises(UnknownVerifierError, match="unknown reward verifier 'nope'; available"):
        get_verifier("nope")
    assert isinstance(UnknownVerifierError("x"), UserError)

    def other(response, answer):
        return 0.0

    with pytest.raises(ValueError, match="already registered"):
        register_verifier("exact")(other)


# ---------------------------------------------------------------------------------------------
# RewardPool


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=1.5, plugin_modules=PLUGINS) as p:
        yield p


def test_pool_scores_in_order_and_runs_math_in_workers(pool):
    me = str(os.getpid())
    items = [
        ("math", r"\boxed{\frac{1}{2}}", "0.5"),
        ("choice", "The answer is (B).", "B"),
        ("exact", "Blue.", "blue"),
        ("numeric", "Answer: 1,000", "1000"),
        ("math", "Answer: 7", "8"),
        ("test_pid", "", me),  # ran in a worker process
        ("test_pid_inline", "", me),  # inline fast path: ran here
        ("test_noisy", "a", "a"),
    ]
    res = pool.score(items)
    assert res.rewards == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert (res.num_errors, res.num_timeouts) == (0, 0)
    assert res.status == ["ok"] * len(items)
    assert pool.score([]).rewards == []


def test_pool_timeout_is_counted_and_pool_recovers(pool):
    restarts = pool.restarts
    t0 = time.perf_counter()
    res = pool.score(
        [("test_sleep", "", "30"), ("math", r"\boxed{2}", "2"), ("test_sleep", "", "0")]
    )
    elapsed = time.perf_counter() - t0
    assert res.rewards == [0.0, 1.0, 1.0]
    assert (res.num_timeouts, res.num_errors) == (1, 0)
    assert res.status == ["timeout", "ok", "ok"]
    assert "no result within 1.5 s" in res.errors[0]
    assert elapsed < 10, elapsed  # the 30 s sleeper was killed, not waited for
    assert pool.restarts == restarts + 1
    again = pool.score([("math", r"\boxed{3}", "3"), ("test_spin", "", "")])
    assert again.rewards == [1.0, 0.0] and again.num_timeouts == 1  # a CPU-bound hang too
    assert pool.score([("math", "Answer: 4", "4")]).rewards == [1.0]


def test_pool_errors_are_counted_not_raised(pool):
    res = pool.score(
        [
            ("test_raise", "", ""),
            ("math", "x", ""),  # unparsable gold: the verifier raises in the worker
            ("choice", "(B)", "not a letter"),  # raises in the inline path
            ("test_out_of_range", "", ""),
            ("numeric", "5", "5"),
        ]
    )
    assert res.rewards == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert (res.num_errors, res.num_timeouts) == (4, 0)
    assert res.status == ["error"] * 4 + ["ok"]
    assert "RuntimeError: verifier bug" in res.errors[0]
    assert "expected a number in [0, 1]" in res.errors[3]


def test_pool_survives_a_crashing_worker(pool):
    restarts = pool.restarts
    res = pool.score([("test_crash", "", ""), ("test_noisy", "b", "b"), ("test_crash", "", "")])
    assert res.rewards == [0.0, 1.0, 0.0]
    assert res.num_errors == 2 and "worker exited (code 7)" in res.errors[0]
    assert pool.restarts == restarts + 2
    assert pool.score([("math", r"\boxed{5}", "5")]).rewards == [1.0]


def test_pool_after_an_interrupted_call(pool):
    """A call interrupted mid-item (Ctrl-C, a signal) leaves no stale reply for the next one."""
    import signal

    class Interrupted(Exception):
        pass

    def on_alarm(signum, frame):
        raise Interrupted

    pool.wait_ready()  # both workers take an item before the interruption
    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Interrupted):
            pool.score([("test_sleep", "", "0.6"), ("test_sleep", "", "0.6")])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    res = pool.score([("test_noisy", "a", "b"), ("test_noisy", "a", "b")])
    assert res.rewards == [0.0, 0.0] and res.status == ["ok", "ok"]


def test_unknown_or_unimportable_verifier_is_a_config_error(pool):
    with pytest.raises(UnknownVerifierError, match="'nope'"):
        pool.score([("exact", "a", "a"), ("nope", "a", "a")])

    def local(response, answer):
        return 1.0

    local.__module__ = "__main__"
    register_verifier("test_main_only", overwrite=True)(local)
    with pytest.raises(UserError, match="defined in the __main__ script"):
        pool.score([("test_main_only", "a", "a")])


def test_verifier_module_imported_on_demand_by_workers():
    import _reward_plugins_on_demand  # noqa: F401 — registered here, not in plugin_modules

    with RewardPool(num_workers=1, timeout_s=2.0) as p:
        assert p.score([("test_on_demand", "xyz", "y"), ("test_on_demand", "x", "q")]).rewards == [
            1.0,
            0.0,
        ]


def test_bad_plugin_module_and_workers_that_cannot_start():
    with pytest.raises(RewardPoolError, match="'no_such_module_xyz' cannot be imported"):
        RewardPool(num_workers=1, plugin_modules=["no_such_module_xyz"])
    p = RewardPool(
        num_workers=1, plugin_modules=["_reward_plugin_broken_in_worker"], max_start_failures=2
    )
    try:
        with pytest.raises(RewardPoolError, match="failed to start 2 times.*cannot load in a"):
            p.score([("math", "1", "1")])
        with pytest.raises(RewardPoolError, match="failed to start 2 times"):
            p.score([("math", "1", "1")])  # stays broken: says so again instead of waiting
    finally:
        p.close()


def test_inline_only_pool_without_workers():
    with RewardPool(num_workers=0) as p:
        res = p.score([("math", r"\boxed{0.5}", r"\frac{1}{2}"), ("exact", "no", "yes")])
    assert res.rewards == [1.0, 0.0]


def test_workers_exit_when_the_training_process_dies(tmp_path):
    """A killed trainer leaves no reward workers behind, even one stuck in a verifier."""
    import subprocess
    import sys

    script = tmp_path / "trainer.py"
    script.write_text(
        "import os, sys, threading, time\n"
        "from megatron_copd.rewards import RewardPool\n"
        "pool = RewardPool(num_workers=2, timeout_s=60, plugin_modules=['_reward_plugins'])\n"
        "pool.wait_ready()\n"
        "print(' '.join(map(str, pool.worker_pids)), flush=True)\n"
        "threading.Timer(0.5, lambda: os._exit(9)).start()\n"
        "pool.score([('test_sleep', '', '60'), ('math', '1', '1')])\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__)] + sys.path)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 9, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if _alive(p)]
    assert not alive, f"reward workers still running: {alive}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too (its parent, the test's child, is gone; init reaps it)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
