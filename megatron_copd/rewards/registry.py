"""The verifier registry: names -> ``fn(response, answer) -> float in [0, 1]``.

Register your own verifier in an importable module::

    # my_pkg/my_rewards.py
    from megatron_copd.rewards import register_verifier

    @register_verifier("unit_answer")
    def unit_answer(response: str, answer: str) -> float:
        return float(answer in response)

and give that module to the pool (``RewardPool(plugin_modules=["my_pkg.my_rewards"])``) so every
worker process imports it. The pool also imports a verifier's defining module in the worker on
first use, so a module imported by the training process is enough; a verifier defined in the
``__main__`` script cannot be imported by a worker and is rejected with a clear message.

``inline=True`` marks a verifier as cheap and unable to hang (no unbounded loops, only linear
regexes): the pool runs it in the calling process, without a process round-trip and therefore
without a time limit. The built-in ``exact``, ``choice`` and ``numeric`` are inline; ``math``
(sympy, unbounded) is not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from megatron_copd.errors import UserError

__all__ = [
    "Verifier",
    "VerifierSpec",
    "UnknownVerifierError",
    "register_verifier",
    "get_verifier",
    "verifier_spec",
    "available_verifiers",
]

Verifier = Callable[[str, str], float]


class UnknownVerifierError(UserError, KeyError):
    """A reward name that no registered verifier has."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class VerifierSpec:
    name: str
    fn: Verifier
    module: str
    """Module that registers the verifier (imported by worker processes on demand)."""
    inline: bool


_REGISTRY: dict[str, VerifierSpec] = {}


def register_verifier(
    name: str, *, inline: bool = False, overwrite: bool = False
) -> Callable[[Verifier], Verifier]:
    """Decorator: register ``fn(response, answer) -> float`` in [0, 1] under ``name``.

    Registering the same function again (a module imported twice) is a no-op; another function
    under a taken name is an error unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_verifier: name must be a non-empty string, got {name!r}")

    def deco(fn: Verifier) -> Verifier:
        spec = VerifierSpec(name, fn, getattr(fn, "__module__", "__main__") or "__main__", inline)
        old = _REGISTRY.get(name)
        same = old is not None and (old.module, getattr(old.fn, "__qualname__", None)) == (
            spec.module,
            getattr(fn, "__qualname__", None),
        )
        if old is not None and not same and not overwrite:
            raise ValueError(
                f"register_verifier: {name!r} is already registered by "
                f"{old.module}.{getattr(old.fn, '__qualname__', old.fn)}; pass overwrite=True"
            )
        _REGISTRY[name] = spec
        return fn

    return deco


def verifier_spec(name: str) -> VerifierSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownVerifierError(
            f"unknown reward verifier {name!r}; available: {available_verifiers()} "
            "(register your own with megatron_copd.rewards.register_verifier)"
        ) from None


def get_verifier(name: str) -> Verifier:
    """The function registered under ``name`` (UnknownVerifierError lists the known names)."""
    return verifier_spec(name).fn


def available_verifiers() -> list[str]:
    return sorted(_REGISTRY)
