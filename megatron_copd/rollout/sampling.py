"""Token choice from full-vocabulary logits: temperature, top-k, top-p, greedy; pure functions.

Randomness comes from a counter-based hash of ``(seed, sample id, step)`` instead of a stateful
generator: one uniform per sample and step, turned into a token by inverting the CDF of the
sampling distribution. So a sample's tokens depend only on its seed, its id and the model — not on
how samples are batched, sorted or micro-batched, nor on the TP/PP layout — and every TP rank
draws the same token from the same (gathered) logits without any extra communication.

Log-probs returned for a sampled token ``y``:

* ``logprob`` — ``log softmax(logits)[y]``: the policy itself at temperature 1 over the full
  vocabulary, with no truncation. This is what the training forward computes, so it is the value
  the GRPO ratio and the OPD advantage compare against.
* ``sampling_logprob`` — ``log q(y)`` of the distribution actually sampled from (temperature,
  top-k, top-p and banned ids applied); equals ``logprob`` when temperature is 1 and nothing is
  truncated, and is 0 for greedy decoding. Useful for importance corrections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 = no top-k truncation."""
    stop_ids: tuple[int, ...] = ()
    """Generation of a sample ends after any of these (EOS and friends); the stop token is part
    of the response."""
    seed: int = 0
    """Mix the step / DP rank / branch into it (see :func:`derive_seed`): equal seeds and sample
    ids give equal tokens."""
    banned_ids: tuple[int, ...] = field(default=())
    """Never sampled (e.g. the image placeholder id, which must not appear in a response)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: expected >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: expected >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def derive_seed(*parts: int) -> int:
    """Combine integers (base seed, step, branch, DP rank, ...) into one 32-bit seed."""
    h = 0x9E3779B9
    for p in parts:
        h = _fmix32_int(h ^ _fmix32_int(int(p) & _M32) ^ ((int(p) >> 32) & _M32))
    return h


def _fmix32_int(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values in [0, 2**32).

    Products overflow int64 and wrap; the low 32 bits kept by the mask are exact.
    """
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def uniforms(seed: int, sample_ids: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1), float64 with 53 random bits, from (seed, sample id, step); ``step``
    may be a tensor broadcasting against ``sample_ids`` (all steps at once)."""
    k1 = _fmix32_int((seed & _M32) ^ 0x9E3779B9)
    h1 = _fmix32(_fmix32((sample_ids.long() & _M32) ^ k1) ^ (step & _M32))
    h2 = _fmix32(h1 ^ 0x68E31DA4)
    bits = ((h1 >> 11) << 32) | h2  # 21 + 32 = 53 bits
    return (bits.double() + 0.5) * 2.0**-53


def truncate_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits with banned ids, top-k and top-p applied (-inf outside)."""
    x = logits.float()
    if not params.greedy and params.temperature != 1.0:
        x = x / params.temperature
    neg_inf = torch.finfo(x.dtype).min
    if params.banned_ids:
        x = x.clone()
        x[:, list(params.banned_ids)] = neg_inf
    if params.top_k and params.top_k < x.shape[-1]:
        kth = x.topk(params.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, neg_inf)
    if params.top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # Drop a token when the mass of the tokens before it already reaches top_p; the most
        # likely token always stays.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        x = x.masked_fill(drop, neg_inf)
    return x


def choose_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    sample_ids: torch.Tensor,
    step: int,
    u: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick one token per row of full-vocabulary ``logits [B, V]``.

    Sampling inverts the CDF of ``q`` (in float64) at the sample's uniform: one random number per
    row, so the cost is a softmax and a cumulative sum. ``u``: the rows' uniforms for this step
    if already computed (``uniforms(params.seed, sample_ids, step)``).
    Returns ``(tokens [B] int64, logprob [B], sampling_logprob [B])`` — see the module docstring.
    """
    raw = logits.float()
    x = truncate_logits(raw, params)
    if params.greedy:
        tokens = x.argmax(dim=-1)
        sampling_lp = torch.zeros(tokens.shape, dtype=torch.float32, device=x.device)
    else:
        log_q = torch.log_softmax(x, dim=-1)
        cdf = log_q.double().exp_().cumsum_(dim=-1)
        if u is None:
            u = uniforms(params.seed, sample_ids, step)
        u = u.to(cdf.device) * cdf[:, -1]
        tokens = torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1)
        tokens.clamp_(max=x.shape[-1] - 1)
        sampling_lp = log_q.gather(-1, tokens[:, None]).squeeze(-1)
        if x is raw:  # temperature 1, nothing truncated: q is the policy
            return tokens, sampling_lp, sampling_lp
    logprob = torch.log_softmax(raw, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprob, sampling_lp
