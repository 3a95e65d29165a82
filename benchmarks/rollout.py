"""Rollout throughput: megatron-copd's KV-cached sampler vs a no-cache recompute loop vs
megatron-core's static inference engine (legacy), on one process, same model and batch.

    PYTHONPATH=. python benchmarks/rollout.py [--batches 16 64] [--repeats 3] [--threads 1]

Model: hidden 128, 4 layers, 4 heads / 2 KV heads, FFN 512, vocab 512, fp32 (the toy shape).
Batch: 16-token prompts, 32 sampled tokens (temperature 1, no stop ids, so every method
generates exactly batch x 32 tokens; all three return per-token log-probs). Prints generated
tokens per second, best of --repeats with the methods interleaved. On a shared machine use
--threads 1: with two threads a busy CPU makes the figures swing several-fold.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch
from megatron.core.inference.utils import InferenceMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_copd.config import RunConfig
from megatron_copd.config_base import from_dict
from megatron_copd.models.factory import build_model
from megatron_copd.rollout import layout
from megatron_copd.rollout.generation import generate
from megatron_copd.rollout.sampling import SamplingParams, choose_tokens
from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
from megatron_copd.runtime.distributed import LaunchEnv, free_port, init_distributed
from megatron_copd.runtime.megatron_state import init_megatron_state

PROMPT_LEN = 16
NEW_TOKENS = 32


def build():
    init_distributed(LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    cfg = from_dict(
        RunConfig,
        {
            "branches": [{"name": "bench"}],
            "model": {
                "vocab_size": 512,
                "hidden_size": 128,
                "num_layers": 4,
                "num_attention_heads": 4,
                "num_query_groups": 2,
                "ffn_hidden_size": 512,
                "max_sequence_length": 256,
            },
            "precision": {"dtype": "fp32"},
        },
    )
    groups = build_branch_groups(BranchLayout(("bench",)))
    init_megatron_state(groups, 1234)
    model = build_model(cfg, groups.pgs)
    model.eval()
    return model, groups.pgs


def prompts_of(batch: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    return torch.randint(6, 512, (batch, PROMPT_LEN), generator=gen).tolist()


def run_ours(model, pgs, prompts):
    params = SamplingParams(max_new_tokens=NEW_TOKENS, seed=1)
    ro = generate(model, pgs, prompts, params, kv_batch_size=len(prompts))
    assert int(ro.lengths.sum()) == len(prompts) * NEW_TOKENS


@torch.inference_mode()
def run_no_cache(model, pgs, prompts):
    """Full forward over the whole sequence for every new token (same sampling code)."""
    params = SamplingParams(max_new_tokens=NEW_TOKENS, seed=1)
    batch = layout.pack(prompts, response_width=NEW_TOKENS)
    tokens, valid, p = batch.tokens, batch.valid.clone(), batch.prompt_width
    ids = torch.arange(len(prompts))
    for t in range(NEW_TOKENS):
        width = p + t
        v = valid[:, :width]
        logits = model(tokens[:, :width], layout.position_ids(v), layout.attention_mask(v))
        y, _, _ = choose_tokens(logits[:, -1], params, ids, t)
        tokens[:, width] = y
        valid[:, width] = True


class _Tokenizer:
    """The engine only detokenizes; ids are enough for a benchmark."""

    eod = 0
    bos = None

    def detokenize(self, ids, **_):
        return ""

    def offsets(self, ids, text):
        return [0] * len(ids)


def make_static_engine(model, pgs, batch):
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.engines import StaticInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
        GPTInferenceWrapper,
    )
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    from megatron.core.inference.engines import static_engine

    # its per-call progress bar would flood the output
    static_engine.tqdm = partial(static_engine.tqdm, disable=True)
    context = StaticInferenceContext(batch, PROMPT_LEN + NEW_TOKENS)
    context.config.pg_collection = pgs
    wrapped = GPTInferenceWrapper(model.language_model, context)
    controller = TextGenerationController(wrapped, _Tokenizer())
    return StaticInferenceEngine(controller, max_batch_size=batch, legacy=True)


def run_static(engine, prompts):
    from megatron.core.inference.inference_request import InferenceRequest
    from megatron.core.inference.sampling_params import SamplingParams as MSamplingParams

    sp = MSamplingParams(
        temperature=1.0,
        top_k=0,
        top_p=0.0,
        return_log_probs=True,
        num_tokens_to_generate=NEW_TOKENS,
    )
    sp.no_early_termination = True  # read by the controller with getattr
    requests = [
        InferenceRequest(request_id=str(i), prompt="", sampling_params=sp, prompt_tokens=p)
        for i, p in enumerate(prompts)
    ]
    with InferenceMode.active():  # what the engine's constructor switched on for good
        out = engine.generate(inference_requests=requests)
    lens = {len(r.generated_tokens) for r in out}
    assert lens == {NEW_TOKENS}, lens


def best_rates(fns: dict, tokens: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Best-of-``repeats`` (wall-clock, process-CPU) tokens/s per method, the methods interleaved
    round-robin so that a busy machine slows them alike. CPU time is the steadier figure on a
    shared machine (run with --threads 1 to make it comparable to wall-clock)."""
    for fn in fns.values():
        fn()  # warm-up
    wall = {name: float("inf") for name in fns}
    cpu = dict(wall)
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name] = min(wall[name], time.perf_counter() - w0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    return {name: (tokens / wall[name], tokens / cpu[name]) for name in fns}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, pgs = build()
    print(
        f"torch threads: {torch.get_num_threads()}; prompt {PROMPT_LEN}, new {NEW_TOKENS}; "
        f"generated tokens/s, best of {args.repeats} (wall-clock | process CPU time)"
    )
    print(
        f"{'batch':>5} {'':>6} {'ours KV':>9} {'no-cache':>9} {'static':>9} "
        f"{'ours/no-cache':>14} {'ours/static':>12}"
    )
    for batch in args.batches:
        prompts = prompts_of(batch)
        engine = make_static_engine(model, pgs, batch)
        try:
            rates = best_rates(
                {
                    "ours": partial(run_ours, model, pgs, prompts),
                    "no_cache": partial(run_no_cache, model, pgs, prompts),
                    "static": partial(run_static, engine, prompts),
                },
                batch * NEW_TOKENS,
                args.repeats,
            )
        finally:
            InferenceMode.unset_active()  # the engine leaves it on (see MEGATRON_FACTS.md)
        for i, clock in enumerate(("wall", "cpu")):
            ours, no_cache, static = (rates[k][i] for k in ("ours", "no_cache", "static"))
            print(
                f"{batch:>5} {clock:>6} {ours:>9.0f} {no_cache:>9.0f} {static:>9.0f} "
                f"{ours / no_cache:>14.2f} {ours / static:>12.2f}"
            )


if __name__ == "__main__":
    main()
