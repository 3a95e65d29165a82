"""Rollout throughput: megatron-copd's KV-cached sampler vs a no-cache recompute loop vs
megatron-core's static inference engine (legacy) vs Hugging Face ``generate`` on the exported
weights, on one process, same model and batch.

    PYTHONPATH=. python benchmarks/rollout.py [--batches 16 64] [--repeats 3] [--threads 1]

Model: hidden 128, 4 layers, 4 heads / 2 KV heads, FFN 512, vocab 512, fp32 (the toy shape).
Batch: 16-token prompts, 32 sampled tokens (temperature 1, no stop ids, so every method
generates exactly batch x 32 tokens; all four return per-token log-probs). Prints generated
tokens per second, best of --repeats with the methods interleaved. On a shared machine use
--threads 1: with two threads a busy CPU makes the figures swing several-fold.

HF: the megatron model is saved (torch_dist) and exported with the project's converter
(``convert_to_hf``) to a temporary directory, loaded with transformers (fp32, eval, CPU) and
checked to give the same logits; then ``generate(do_sample=True, temperature=1, top_k=0,
min_new_tokens=max_new_tokens=32, no EOS)`` with its default dynamic KV cache and
``output_logits``, the log-probs of the sampled tokens taken from those logits (in the timing).
--no-hf skips it. HF CB: the same export through transformers' continuous-batching
``generate_batch`` (paged KV cache, requests scheduled as they finish; it runs on the CPU), same
sampling settings, ``min_new_tokens`` = 32 (--no-hf-cb skips it: it is slow on a CPU).

Our sampler's decode steps run ``rollout.fast_decode`` (the default); the column "megatron
step" is the same sampler with ``fast_decode=False`` (megatron's static-inference decode step),
i.e. the sampler before the fast path.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from megatron.core.inference.utils import InferenceMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_copd.checkpoint.meta import make_meta
from megatron_copd.checkpoint.model_io import save_model
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
# the toy shape (benchmarks/rl_step.py uses it too)
TOY_MODEL = {
    "vocab_size": 512,
    "hidden_size": 128,
    "num_layers": 4,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "ffn_hidden_size": 512,
    "max_sequence_length": 256,
}
# HF sampling equal to ours: temperature 1, no truncation, exactly NEW_TOKENS tokens
HF_SAMPLING = dict(
    do_sample=True,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    max_new_tokens=NEW_TOKENS,
    min_new_tokens=NEW_TOKENS,
    eos_token_id=None,
    pad_token_id=0,
)


def build():
    init_distributed(LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    cfg = from_dict(
        RunConfig,
        {
            "branches": [{"name": "bench", "domains": ["text"]}],
            "model": TOY_MODEL,
            "precision": {"dtype": "fp32"},
        },
    )
    groups = build_branch_groups(BranchLayout(("bench",)))
    init_megatron_state(groups, 1234)
    model = build_model(cfg, groups.pgs)
    model.eval()
    return model, groups.pgs, cfg


def export_to_hf(model, pgs, cfg, workdir: Path):
    """The benchmark's model through save_model + convert_to_hf, loaded with transformers."""
    import transformers

    from megatron_copd.models.conversion.hf_export import convert_to_hf

    ckpt = save_model(model, pgs, workdir / "ckpt", make_meta(cfg.model, "bench", None))
    result = convert_to_hf(ckpt, workdir / "hf", with_tokenizer=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(result.output), dtype=torch.float32
    ).eval()
    # the export must compute what the megatron model computes, or the comparison means nothing
    tokens = torch.tensor(prompts_of(4))
    s = tokens.shape[1]
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1).view(1, 1, s, s)
    with torch.no_grad():
        ref = model(tokens, torch.arange(s).expand_as(tokens), mask)
        got = hf(input_ids=tokens).logits
    diff = (ref - got).abs().max().item()
    assert diff < 1e-4, f"HF export logits differ from megatron's by {diff}"
    return hf, result.architecture, diff


def prompts_of(batch: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    return torch.randint(6, 512, (batch, PROMPT_LEN), generator=gen).tolist()


def run_ours(model, pgs, prompts, fast=True):
    params = SamplingParams(max_new_tokens=NEW_TOKENS, seed=1)
    ro = generate(model, pgs, prompts, params, kv_batch_size=len(prompts), fast_decode=fast)
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
    from megatron.core.inference.engines import StaticInferenceEngine, static_engine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
        GPTInferenceWrapper,
    )
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    # its per-call progress bar would flood the output
    static_engine.tqdm = partial(static_engine.tqdm, disable=True)
    context = StaticInferenceContext(batch, PROMPT_LEN + NEW_TOKENS)
    context.config.pg_collection = pgs
    wrapped = GPTInferenceWrapper(model.language_model, context)
    controller = TextGenerationController(wrapped, _Tokenizer())
    return StaticInferenceEngine(controller, max_batch_size=batch, legacy=True)


def run_static(engine, prompts):
    from megatron.core.inference.inference_request import InferenceRequest
    from megatron.core.inference.sampling_params import (
        SamplingParams as MSamplingParams,
    )

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


@torch.no_grad()
def run_hf(hf, prompts):
    input_ids = torch.tensor(prompts)
    out = hf.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        **HF_SAMPLING,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[:, input_ids.shape[1] :]
    assert new.shape == (len(prompts), NEW_TOKENS), new.shape
    # temperature 1, no top-k/p: the sampling policy's log-probs are those of the raw logits
    logits = torch.stack(out.logits, dim=1)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
    assert logp.shape == new.shape and bool(torch.isfinite(logp).all())


@torch.no_grad()
def run_hf_cb(hf, prompts):
    import transformers

    gc = transformers.GenerationConfig(**HF_SAMPLING)
    out = hf.generate_batch(prompts, generation_config=gc, warmup=False)
    lens = {len(o.generated_tokens) for o in out.values()}
    assert len(out) == len(prompts) and lens == {NEW_TOKENS}, (len(out), lens)


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
    ap.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    ap.add_argument("--no-hf-cb", action="store_true", help="skip HF continuous batching")
    args = ap.parse_args()
    model, pgs, cfg = build()
    if args.threads:  # after build: init_distributed sets the thread count for its ranks
        torch.set_num_threads(args.threads)
    hf = None
    tmp = tempfile.TemporaryDirectory(prefix="rollout-bench-")
    if not args.no_hf:
        import transformers

        hf, arch, diff = export_to_hf(model, pgs, cfg, Path(tmp.name))
        print(
            f"HF: exported to {arch}, transformers {transformers.__version__}; max |logit "
            f"difference| vs megatron {diff:.1e}"
        )
    print(
        f"torch threads: {torch.get_num_threads()}; prompt {PROMPT_LEN}, new {NEW_TOKENS}; "
        f"generated tokens/s, best of {args.repeats} (wall-clock | process CPU time)"
    )
    cols = ["ours KV", "megatron step", "no-cache", "static", "HF gen", "HF CB"]
    print(f"{'batch':>5} {'':>6} " + " ".join(f"{c:>13}" for c in cols)
          + f" {'ours/HF gen':>12} {'ours/HF CB':>11} {'ours/megatron step':>19}")
    for batch in args.batches:
        prompts = prompts_of(batch)
        engine = make_static_engine(model, pgs, batch)
        try:
            fns = {
                "ours": partial(run_ours, model, pgs, prompts),
                "megatron_step": partial(run_ours, model, pgs, prompts, fast=False),
                "no_cache": partial(run_no_cache, model, pgs, prompts),
                "static": partial(run_static, engine, prompts),
            }
            if hf is not None:
                fns["hf"] = partial(run_hf, hf, prompts)
            rates = best_rates(fns, batch * NEW_TOKENS, args.repeats)
        finally:
            InferenceMode.unset_active()  # the engine leaves it on (see MEGATRON_FACTS.md)
        if hf is not None and not args.no_hf_cb:  # one call (seconds per call on a CPU)
            w0, c0 = time.perf_counter(), time.process_time()
            run_hf_cb(hf, prompts)
            n = batch * NEW_TOKENS
            rates["hf_cb"] = (n / (time.perf_counter() - w0), n / (time.process_time() - c0))
        nan = (float("nan"), float("nan"))
        for i, clock in enumerate(("wall", "cpu")):
            vals = [rates.get(k, nan)[i] for k in
                    ("ours", "megatron_step", "no_cache", "static", "hf", "hf_cb")]
            ours = vals[0]
            print(f"{batch:>5} {clock:>6} " + " ".join(f"{v:>13.0f}" for v in vals)
                  + f" {ours / vals[4]:>12.2f} {ours / vals[5]:>11.2f} {ours / vals[1]:>19.2f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
