"""A verifier module that is not listed in plugin_modules: workers import it on first use."""

from megatron_copd.rewards import register_verifier


@register_verifier("test_on_demand")
def contains(response: str, answer: str) -> float:
    return 1.0 if answer in response else 0.0
