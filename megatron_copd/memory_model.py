"""Per-GPU memory of a run, by phase, as the code runs today: what `copd check` prints and refuses.

Resident all run: weights, gradients and optimizer state (``model_size.memory_per_gpu``). On top,
one phase at a time on the most loaded GPU (each pipeline stage is computed, the largest kept):

- training (GRPO / OPD update) of one micro-batch of ``grpo.micro_batch_size`` samples padded to
  T = ``data.max_prompt_tokens + grpo.max_new_tokens`` tokens (with
  ``grpo.max_tokens_per_micro_batch``: that many tokens, or one row of T if more):
  - the activations every layer of the stage keeps for the backward. Transformer Engine's
    fused layers (Korthikanti et al. 2022's accounting, for GQA and SwiGLU): layer inputs and
    norms ``4 s b h`` (divided by TP under sequence parallelism), Q/K/V and the attention
    output ``s b (a + 2 g + a) d / t``, the rotated queries and keys ``s b (a + g) d / t``, the
    MLP ``3 s b f / t``. megatron's local layers (CPU) save more, counted with saved-tensor
    hooks: ``6 s b h`` of inputs, norms and residuals, ``s b (4 a + 6 g) d / t`` of attention
    tensors, ``5 s b f / t`` in the unfused SwiGLU MLP;
  - the attention runs without a mask (training rows start at column 0) in a fused kernel
    (TE's flash / cuDNN on CUDA, torch's scaled_dot_product_attention on the local layers),
    which keeps only its fp32 softmax statistics ``4 b a s / t``;
  - the last stage's logits: the model's output (activation dtype), the loss's fp32 copy, the
    cross entropy's saved softmax and the logits' gradient, ``(x + 12) b T V / t`` bytes for
    x-byte activations;
- rollout: the KV cache ``B x (P + R) x layers x 2 x g / t x d`` for B = ``grpo.rollout_batch_size``
  rows (whole prompt groups) of P prompt and R response tokens, and the prefill of its
  ``B / group_size`` prompts (each prompt runs once, its cache rows are copied to its samples):
  with Transformer Engine only equal-length prompts share a KV batch, so no mask and one layer's
  working set; on the local layers the ``[B/G, 1, P, P]`` mask and one layer's scores;
- scoring (teacher log-probs, evaluation): one micro-batch forward without stored activations
  (rows start at column 0, no mask, the fused attention) and the logits.

Activations use the training dtype (bf16 by default with CUDA); the vision tower's activations
are not counted (small next to the decoder's at these lengths). The model is checked against
measured CPU peaks (``benchmarks/memory.py``, figures in docs/GPU.md), not yet on GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_copd.config import RunConfig
from megatron_copd.model_size import memory_per_gpu, params_per_gpu

GiB = float(2**30)


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    setting: str
    """The config key(s) that size this term (what to change when it does not fit)."""


@dataclass
class Phase:
    name: str
    terms: list[Term] = field(default_factory=list)

    @property
    def bytes(self) -> float:
        return sum(t.bytes for t in self.terms)


@dataclass
class MemoryModel:
    resident: float
    """Weights, gradients and optimizer state on the most loaded GPU."""
    phases: list[Phase]
    kv_bytes_per_row: float = 0.0
    """The rollout KV cache of one row (prompt + response tokens) on this GPU."""

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.bytes)

    @property
    def peak(self) -> float:
        return self.resident + self.peak_phase.bytes


def memory_model(cfg: RunConfig, assume_cuda: bool = True) -> MemoryModel:
    m, p, g = cfg.model, cfg.parallel, cfg.grpo
    dtype = cfg.precision.dtype or ("bf16" if assume_cuda else "fp32")
    act = 4.0 if dtype == "fp32" else 2.0
    t, stages = p.tp, p.pp
    layers = m.num_layers // stages
    h, a, kv, d, f, v = (m.hidden_size, m.num_attention_heads, m.num_query_groups, m.head_dim,
                         m.ffn_hidden_size, m.vocab_size)
    prompt, response = cfg.data.max_prompt_tokens, g.max_new_tokens
    seq = min(prompt + response, m.max_sequence_length)
    budget = g.max_tokens_per_micro_batch
    # A token-budget micro-batch holds at most max(budget, one longest row) tokens.
    b = max(budget, seq) / seq if budget else g.micro_batch_size
    rows_name = f"{max(budget, seq)}" if budget else f"{b} x {seq}"
    mb_key = "grpo.max_tokens_per_micro_batch" if budget else "grpo.micro_batch_size"
    lengths = "data.max_prompt_tokens + grpo.max_new_tokens"

    def scores(rows: int, s: int) -> float:  # one layer's scores and softmax (a mask given)
        return 2 * rows * (a / t) * s * s * act

    def unmasked(rows: int, s: int) -> float:  # a fused kernel's fp32 softmax statistics
        return rows * (a / t) * s * 4.0

    def logits(rows: int, s: int, backward: bool = True) -> float:
        # the output (act bytes), the loss's fp32 copy, [the saved softmax and the gradient]
        return rows * s * (v / t) * (act + 4.0 + (8.0 if backward else 0.0))

    sp = t if p.sequence_parallel else 1
    if assume_cuda:  # Transformer Engine's fused layers (Korthikanti et al.)
        per_token = 4 * h / sp + (a + 2 * kv + a) * d / t + (a + kv) * d / t + 3 * f / t
    else:  # megatron's local layers: what they save, counted with saved-tensor hooks
        per_token = 6 * h / sp + (4 * a + 6 * kv) * d / t + 5 * f / t
    per_layer = seq * b * per_token * act
    if p.recompute == "full":
        kept = layers * seq * b * h * act + per_layer + unmasked(b, seq)
        attention = 0.0
    else:
        kept = layers * per_layer
        attention = layers * unmasked(b, seq)
    what = "softmax statistics (fused attention)"
    train = Phase("training", [
        Term(f"activations of {layers} layers, [{rows_name}] tokens", kept,
             f"{mb_key}, {lengths}, parallel.recompute"),
        Term(f"{what} x {layers} layers", attention,
             f"{mb_key}, {lengths}, parallel.recompute"),
        Term("logits, their fp32 copy, softmax and gradient", logits(b, seq), mb_key),
    ])
    rows = max(1, g.rollout_batch_size // g.group_size) * g.group_size
    kv_row = (prompt + response) * layers * 2 * (kv / t) * d * act
    prompts = max(1, rows // g.group_size)  # prefilled once per prompt, cache rows copied
    if assume_cuda:  # TE: equal-length prompts per KV batch, no mask, the fused kernel
        prefill = Term(f"prefill: one layer's working set, {prompts} prompts x P tokens",
                       prompts * prompt * (2 * h + (a + 2 * kv) * d / t + 2 * f / t) * act,
                       "grpo.rollout_batch_size")
    else:  # local layers: left-padded prompts of different lengths, an explicit mask
        prefill = Term(f"prefill mask and one layer's scores [{prompts}, P, P]",
                       prompts * prompt * prompt + scores(prompts, prompt),
                       "grpo.rollout_batch_size")
    rollout = Phase("rollout", [
        Term(f"KV cache, {rows} rows x {prompt + response} tokens", rows * kv_row,
             "grpo.rollout_batch_size"),
        prefill,
    ])
    scoring = Phase("scoring", [
        Term("one layer's attention", unmasked(b, seq), f"{mb_key}, {lengths}"),
        Term("logits and their fp32 copy", logits(b, seq, backward=False), mb_key),
    ])
    per_param = memory_per_gpu(cfg, assume_cuda).bytes_per_param
    return MemoryModel(max(params_per_gpu(cfg)) * per_param, [train, rollout, scoring], kv_row)


def fits(cfg: RunConfig, gpu_memory_gb: float, assume_cuda: bool = True) -> str | None:
    """None when the peak fits the card, else one line naming the setting to change."""
    model = memory_model(cfg, assume_cuda)
    card = gpu_memory_gb * GiB
    if model.peak <= card:
        return None
    phase = model.peak_phase
    worst = max(phase.terms, key=lambda term: term.bytes)
    line = (f"{worst.setting.split(',')[0]}: the {phase.name} phase needs "
            f"~{model.peak / GiB:.0f} GiB per GPU ({worst.name}: {worst.bytes / GiB:.0f} GiB) of "
            f"{gpu_memory_gb:.0f} GiB")
    if worst.name.startswith("KV cache"):
        room = card - model.resident - (phase.bytes - worst.bytes)
        line += f"; at most {max(0, int(room // model.kv_bytes_per_row))} rows fit"
    else:
        line += f"; change {worst.setting}"
    return line
