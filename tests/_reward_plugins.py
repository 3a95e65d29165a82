"""Verifiers used by tests/test_rewards.py, imported by the reward workers as a plugin module."""

import os
import time

from megatron_copd.rewards import register_verifier


@register_verifier("test_sleep")
def sleep_then_one(response: str, answer: str) -> float:
    time.sleep(float(answer))
    return 1.0


@register_verifier("test_spin")
def spin_forever(response: str, answer: str) -> float:
    while True:  # a CPU-bound hang (no sleep to interrupt)
        pass


@register_verifier("test_raise")
def always_raises(response: str, answer: str) -> float:
    raise RuntimeError("verifier bug")


@register_verifier("test_crash")
def kills_its_process(response: str, answer: str) -> float:
    os._exit(7)


@register_verifier("test_noisy")
def prints_a_lot(response: str, answer: str) -> float:
    print("chatty verifier output {", flush=True)  # must not corrupt the worker's reply channel
    return 1.0 if response == answer else 0.0


@register_verifier("test_out_of_range")
def out_of_range(response: str, answer: str) -> float:
    return 2.0


@register_verifier("test_pid")
def other_process(response: str, answer: str) -> float:
    """1.0 when run in a process other than pid ``answer``."""
    return 1.0 if os.getpid() != int(answer) else 0.0


@register_verifier("test_pid_inline", inline=True)
def same_process(response: str, answer: str) -> float:
    return 1.0 if os.getpid() == int(answer) else 0.0
