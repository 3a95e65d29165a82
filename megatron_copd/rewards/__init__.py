"""Verifiable rewards: a registry of verifiers and a process pool that runs them with time limits.

    from megatron_copd.rewards import RewardPool
    with RewardPool(num_workers=2, timeout_s=5.0, plugin_modules=["my_pkg.my_rewards"]) as pool:
        result = pool.score([("math", response, answer), ("choice", response2, "B")])
        result.rewards, result.num_errors, result.num_timeouts

This package imports no torch, so worker processes start quickly.
"""

from megatron_copd.rewards.builtin import (
    make_numeric_verifier,
    verify_choice,
    verify_exact,
    verify_math,
    verify_numeric,
)
from megatron_copd.rewards.pool import RewardPool, RewardPoolError, RewardResult
from megatron_copd.rewards.registry import (
    UnknownVerifierError,
    Verifier,
    VerifierSpec,
    available_verifiers,
    get_verifier,
    register_verifier,
    verifier_spec,
)

__all__ = [
    "RewardPool",
    "RewardPoolError",
    "RewardResult",
    "UnknownVerifierError",
    "Verifier",
    "VerifierSpec",
    "available_verifiers",
    "get_verifier",
    "make_numeric_verifier",
    "register_verifier",
    "verifier_spec",
    "verify_choice",
    "verify_exact",
    "verify_math",
    "verify_numeric",
]
