"""One GPU, random weights, Qwen3 shapes: training-step tokens/s and MFU, rollout tokens/s and
teacher-scoring tokens/s, at BF16 and FP8, with the FP8/BF16 ratios. Everything goes through
the project's own paths: ``BranchModel.train_step`` (megatron DDP + optimizer, fp32 master
weights), ``rollout.generation`` (KV cache) and ``rollout.scoring.score_responses``.

    python benchmarks/gpu_step.py --model 1.7b                   # BF16 and FP8 (tensorwise)
    python benchmarks/gpu_step.py --model 1.7b --fp8-recipe delayed --recompute selective
    python benchmarks/gpu_step.py --model 1.7b --mask causal     # no explicit mask: flash path
    python benchmarks/gpu_step.py --tiny                         # CPU smoke run (the test)

FLOPs (model FLOPs, no recomputation counted; MFU = achieved / peak):
  training step = 6 * N * tokens + 6 * L * n_heads * head_dim * sum_seq(T^2)
  scoring       = 2 * N * tokens + 2 * L * n_heads * head_dim * sum_seq(T^2)
N = parameters of every GEMM (attention q/k/v/o, SwiGLU MLP, LM head; not the embedding
lookup, not norms). The attention term is causal: QK^T and AV each cost 2 * T^2 * head_dim per
head over the full square, half of that under a causal mask. FP8 runs are reported against the
same BF16 dense peak (989 TFLOP/s on H100/H200 SXM), so MFU ratios read as speed-ups.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Qwen3 decoder shapes (config.json of the released models); tiny = the CPU smoke test.
SHAPES: dict[str, dict] = {
    "tiny": {"vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4,
             "num_query_groups": 2, "ffn_hidden_size": 128},
    "0.6b": {"vocab_size": 151936, "hidden_size": 1024, "num_layers": 28,
             "num_attention_heads": 16, "num_query_groups": 8, "kv_channels": 128,
             "ffn_hidden_size": 3072},
    "1.7b": {"vocab_size": 151936, "hidden_size": 2048, "num_layers": 28,
             "num_attention_heads": 16, "num_query_groups": 8, "kv_channels": 128,
             "ffn_hidden_size": 6144},
    "4b": {"vocab_size": 151936, "hidden_size": 2560, "num_layers": 36,
           "num_attention_heads": 32, "num_query_groups": 8, "kv_channels": 128,
           "ffn_hidden_size": 9728},
}

# Dense BF16 tensor-core peaks (FLOP/s) by device-name substring, most specific first.
PEAKS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12),
    ("H100", 989e12), ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12),
]


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int

    @classmethod
    def of(cls, d: dict) -> Shape:
        head_dim = d.get("kv_channels") or d["hidden_size"] // d["num_attention_heads"]
        return cls(d["vocab_size"], d["hidden_size"], d["num_layers"], d["num_attention_heads"],
                   d["num_query_groups"], head_dim, d["ffn_hidden_size"])

    @property
    def gemm_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.ffn
        return self.layers * per_layer + self.hidden * self.vocab

    def attention_fwd_flops(self, seq_lens: list[int]) -> float:
        return 2.0 * self.layers * self.heads * self.head_dim * sum(t * t for t in seq_lens)


def train_flops(shape: Shape, seq_lens: list[int]) -> float:
    return 6.0 * shape.gemm_params * sum(seq_lens) + 3.0 * shape.attention_fwd_flops(seq_lens)


def forward_flops(shape: Shape, seq_lens: list[int]) -> float:
    return 2.0 * shape.gemm_params * sum(seq_lens) + shape.attention_fwd_flops(seq_lens)


def device_peak(name: str) -> float | None:
    for key, peak in PEAKS:
        if key.lower() in name.lower():
            return peak
    return None


# ---------------------------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls (after the caller's warm-up)."""
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return best


def _config(args, precision: dict):
    from megatron_copd.config import RunConfig, validate
    from megatron_copd.config_base import from_dict

    shape = dict(SHAPES[args.model])
    seq = max(args.seq_len, args.prompt_len + args.new_tokens)
    cfg = from_dict(RunConfig, {
        "branches": [{"name": "bench", "domains": ["text"]}],
        "model": {**shape, "max_sequence_length": seq},
        "parallel": {"recompute": args.recompute},
        "precision": precision,
        "optim": {"lr": 1e-5},
    })
    return validate(cfg, world_size=1)


def _train_batches(args, vocab: int, device) -> list[dict]:
    from megatron_copd.rollout import layout

    gen = torch.Generator().manual_seed(0)
    b, t = args.micro_batch, args.seq_len
    out = []
    for _ in range(args.micro_batches):
        tokens = torch.randint(6, vocab, (b, t), generator=gen)
        valid = torch.ones(b, t, dtype=torch.bool)
        loss_mask = torch.ones(b, t)
        loss_mask[:, -1] = 0
        mb = {
            "tokens": tokens,
            "labels": torch.roll(tokens, -1, dims=1),
            "position_ids": layout.position_ids(valid),
            "attention_mask": layout.attention_mask(valid) if args.mask == "explicit" else None,
            "loss_mask": loss_mask,
        }
        out.append({k: (v.to(device) if v is not None else None) for k, v in mb.items()})
    return out


def _prompts(args, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(6, vocab, (args.rollout_prompts, args.prompt_len), generator=gen).tolist()


def measure(args, groups, name: str, precision: dict, peak: float | None) -> dict:
    """Build the branch model at ``precision``, time train steps, rollout and scoring."""
    from megatron_copd.rollout.generation import generate, model_device
    from megatron_copd.rollout.sampling import SamplingParams
    from megatron_copd.rollout.scoring import ScoreSpec, score_responses
    from megatron_copd.runtime.megatron_state import seed_everything
    from megatron_copd.training.branch_model import BranchModel
    from megatron_copd.training.losses import sft_loss

    cfg = _config(args, precision)
    shape = Shape.of(SHAPES[args.model])
    seed_everything(1234)
    branch = BranchModel(cfg, groups, image_token_id=None, total_steps=10**6)
    device = model_device(branch.model)
    batches = _train_batches(args, shape.vocab, device)
    loss = sft_loss(groups.pgs.tp)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        branch.train_step(batches, loss, args.seq_len)
    step_s = _timed(lambda: branch.train_step(batches, loss, args.seq_len), args.steps)
    seqs = [args.seq_len] * (args.micro_batch * args.micro_batches)
    flops = train_flops(shape, seqs)
    res = {
        "precision": name,
        "train_step_s": step_s,
        "train_tokens_per_s": sum(seqs) / step_s,
        "train_tflops": flops / step_s / 1e12,
        "train_mfu": flops / step_s / peak if peak else None,
    }
    if torch.cuda.is_available():
        res["train_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30

    model, pgs = branch.model, groups.pgs
    prompts = _prompts(args, shape.vocab)
    params = SamplingParams(max_new_tokens=args.new_tokens, seed=7)
    n_new = len(prompts) * args.new_tokens

    def rollout():
        ro = generate(model, pgs, prompts, params, kv_batch_size=args.rollout_batch)
        assert int(ro.lengths.sum()) == n_new  # no stop ids: every sample runs to the end
        return ro

    ro = rollout()  # warm-up; its responses are what the teacher scores
    responses = ro.responses()
    spec = ScoreSpec(topk=10, entropy=False)
    score_lens = [args.prompt_len + args.new_tokens] * len(prompts)

    def score():
        score_responses(model, pgs, prompts, responses, spec=spec,
                        micro_batch_size=args.score_batch)

    modes = [("", False)]
    if precision.get("fp8"):
        modes.append(("_fp8", True))  # precision.fp8_rollout: FP8 inference forwards
    for suffix, fp8_inference in modes:
        model.fp8_inference = fp8_inference
        if suffix:
            rollout()
        score()
        roll_s = _timed(rollout, args.repeats)
        score_s = _timed(score, args.repeats)
        res[f"rollout_tokens_per_s{suffix}"] = n_new / roll_s
        res[f"scoring_tokens_per_s{suffix}"] = sum(score_lens) / score_s
        res[f"scoring_tflops{suffix}"] = forward_flops(shape, score_lens) / score_s / 1e12
    model.fp8_inference = False
    return res


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.0f}" if v >= 100 else (f"{v:.2f}" if v >= 1 else f"{v:.3g}")
    return str(v)


def report(results: list[dict], header: str) -> str:
    keys = ["train_tokens_per_s", "train_tflops", "train_mfu", "train_peak_gib",
            "rollout_tokens_per_s", "scoring_tokens_per_s", "scoring_tflops",
            "rollout_tokens_per_s_fp8", "scoring_tokens_per_s_fp8"]
    lines = [header]
    names = [r["precision"] for r in results]
    lines.append(f"{'':28}" + "".join(f"{n:>16}" for n in names))
    for k in keys:
        if any(k in r for r in results):
            row = []
            for r in results:
                v = r.get(k)
                if k.endswith("_mfu"):
                    row.append("n/a" if v is None else f"{100 * v:.1f}%")
                else:
                    row.append(_fmt(v) if k in r else "-")
            lines.append(f"{k:28}" + "".join(f"{c:>16}" for c in row))
    by = {r["precision"]: r for r in results}
    if "bf16" in by and "fp8" in by:
        b, f = by["bf16"], by["fp8"]
        lines.append(
            "FP8/BF16: train tokens/s x{:.2f}, rollout (FP8 forwards) x{:.2f}, "
            "scoring (FP8 forwards) x{:.2f}".format(
                f["train_tokens_per_s"] / b["train_tokens_per_s"],
                f["rollout_tokens_per_s_fp8"] / b["rollout_tokens_per_s"],
                f["scoring_tokens_per_s_fp8"] / b["scoring_tokens_per_s"],
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="1.7b")
    ap.add_argument("--tiny", action="store_true", help="tiny model, few steps (runs on CPU)")
    ap.add_argument("--precisions", default=None,
                    help="comma list of bf16,fp8 (GPU default: both) or fp32 (CPU default)")
    ap.add_argument("--fp8-recipe", default="tensorwise",
                    choices=["delayed", "tensorwise", "blockwise", "mxfp8"])
    ap.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    ap.add_argument("--mask", default="explicit", choices=["explicit", "causal"],
                    help="explicit [B,1,T,T] masks as training passes them, or none (causal)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed train steps (best is kept)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rollout-prompts", type=int, default=64)
    ap.add_argument("--rollout-batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--score-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="BF16 dense peak of the device (default: detected for H100/H200/...)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if args.tiny:
        args.model = "tiny"
        args.seq_len, args.micro_batch, args.micro_batches = 32, 2, 2
        args.steps, args.warmup, args.repeats = 2, 1, 1
        args.rollout_prompts, args.rollout_batch = 4, 4
        args.prompt_len, args.new_tokens, args.score_batch = 8, 8, 2
    if args.model != "tiny" and not cuda:
        print(f"gpu_step: --model {args.model} needs a CUDA GPU; none here "
              "(use --tiny for the CPU smoke run)", file=sys.stderr)
        return 2
    precisions = (args.precisions or ("bf16,fp8" if cuda else "fp32")).split(",")

    from megatron_copd.errors import UserError
    from megatron_copd.model_size import human, memory_per_gpu
    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.distributed import LaunchEnv, free_port, init_distributed
    from megatron_copd.runtime.megatron_state import init_megatron_state

    if cuda:
        props = torch.cuda.get_device_properties(0)
        device_name, total_gib = props.name, props.total_memory / 2**30
        est = memory_per_gpu(_config(args, {"dtype": "bf16"}))
        if est.gib > 0.85 * total_gib:
            print(f"gpu_step: --model {args.model} needs ~{est.gib:.0f} GiB for weights, "
                  f"gradients and Adam state alone; {device_name} has {total_gib:.0f} GiB "
                  "(use --model 1.7b, or an H200 for 4b)", file=sys.stderr)
            return 2
    else:
        device_name = "CPU"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (device_peak(device_name) if cuda
                                                            else None)

    init_distributed(LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    groups = build_branch_groups(BranchLayout(("bench",)))
    init_megatron_state(groups, 1234)

    shape = Shape.of(SHAPES[args.model])
    header = (
        f"gpu_step: {device_name}, model {args.model} ({human(shape.gemm_params)} GEMM "
        f"params), train {args.micro_batches} x [{args.micro_batch} x {args.seq_len}] per "
        f"step, mask {args.mask}, recompute {args.recompute}; rollout {args.rollout_prompts} "
        f"prompts x ({args.prompt_len} + {args.new_tokens}); peak "
        f"{'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}\n"
        "FLOPs: train 6*N*tokens + 6*L*heads*head_dim*sum(T^2), scoring 2*N*tokens + "
        "2*L*heads*head_dim*sum(T^2) (causal); MFU against the BF16 dense peak"
    )
    results = []
    for name in precisions:
        if name == "fp8":
            precision = {"dtype": "bf16", "fp8": args.fp8_recipe}
        elif name in ("bf16", "fp32", "fp16"):
            precision = {"dtype": name}
        else:
            print(f"gpu_step: --precisions: unknown {name!r}", file=sys.stderr)
            return 2
        try:
            res = measure(args, groups, name, precision, peak)
        except UserError as e:  # e.g. this GPU cannot run the FP8 recipe
            print(f"gpu_step: {name} skipped: {e}", file=sys.stderr)
            continue
        finally:  # the previous model's memory goes before the next one is built
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        if name == "fp8":
            res["fp8_recipe"] = args.fp8_recipe
        results.append(res)
        print(f"  {name}: train {res['train_tokens_per_s']:,.0f} tok/s, rollout "
              f"{res['rollout_tokens_per_s']:,.0f} tok/s, scoring "
              f"{res['scoring_tokens_per_s']:,.0f} tok/s", flush=True)
    print(report(results, header))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"device": device_name, "model": args.model, "args": vars(args), "results": results},
            indent=2))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
