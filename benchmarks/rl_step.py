"""RL step time: megatron-copd's GRPO and OPD steps next to TRL's GRPOTrainer and
DistillationTrainer (on-policy distillation) at the same shape, and cross-branch teacher scoring
next to a local forward of the same tokens.

    PYTHONPATH=. python benchmarks/rl_step.py [--threads 1] [--steps 4] [--no-trl]

Shape (the anchors of issue 16): the toy-shaped Qwen3 model (hidden 128, 4 layers, 4 heads / 2
KV heads, FFN 512, vocab 512, fp32, CPU); 16-token prompts of random ids;
* GRPO: 16 prompts x G=8 samples x 32 new tokens, reward = share of even token ids in the
  response (an in-process function on both sides), group-normalised advantages, one clipped
  policy-gradient update over 8 micro-batches of 16 sequences, Adam;
* OPD: 16 prompts x 1 sample x 32 new tokens from the student, scored by a teacher of the same
  shape, one update. Ours: two branches (student and teacher on their own processes) and the
  project's cross-branch ``score_edges``; TRL: the teacher model in the trainer's process.
Sampling runs to exactly 32 tokens on both sides (no stop id; TRL: ``min_new_tokens``).

Both sides start from the same weights: the megatron model is exported with the project's own
converter and TRL loads that directory. Ours runs ``training.rl_step.RLStep`` (the engine's own
step: rollout, rewards, advantages, teacher scoring, micro-batching, megatron's optimizer step)
with synthetic prompts; TRL runs its trainers' ``train()`` and a callback times each optimizer
step. Reported: median seconds per step after one warm-up step, and the ratio ours / TRL.

TRL is not a project dependency: it is installed into ``.venv-trl`` (a venv layered on the
project's ``.venv`` through a .pth file, so torch and transformers are the same builds), created
on first use. ``--threads`` sets torch's intra-op threads in every process (ours: the student and
the teacher each get that many; they do not compute at the same time in an OPD step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import NEW_TOKENS, PROMPT_LEN, TOY_MODEL as MODEL  # noqa: E402  the same toy shape

VOCAB, PROMPTS, GROUP = MODEL["vocab_size"], 16, 8
LR = 1e-6


def prompts_for(step: int, n: int = PROMPTS) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(6, VOCAB, (n, PROMPT_LEN), generator=gen).tolist()


def even_share(ids) -> float:
    """The benchmark's verifiable reward: share of even token ids in the response."""
    return sum(1 for t in ids if t % 2 == 0) / max(1, len(ids))


# --------------------------------------------------------------------------- ours
class _Tokenizer:
    """Ids in, ids out: the step decodes responses for the verifier; nothing else is needed."""

    pad_id = 0
    eos_id = -1  # no stop id: every sample is NEW_TOKENS long, as on TRL's side
    image_token_id = None

    def decode(self, ids):
        return " ".join(str(t) for t in ids)


class _Rewards:
    def score(self, items):
        from megatron_copd.rewards.pool import RewardResult

        return RewardResult([even_share([int(t) for t in text.split()]) for _, text, _ in items])


class _Data:
    def __init__(self) -> None:
        self.step = 0

    def _batch(self, n):
        from types import SimpleNamespace

        self.step += 1
        return [
            SimpleNamespace(id=f"{self.step}-{i}", domain="bench", reward="even", answer="", ids=p)
            for i, p in enumerate(prompts_for(self.step, n))
        ]

    def native_batch(self, n):
        return self._batch(n)

    def peer_batch(self, teacher, n):
        return self._batch(n)


def _config(branches):
    from megatron_copd.config import RunConfig
    from megatron_copd.config_base import from_dict

    return from_dict(
        RunConfig,
        {
            "branches": [{"name": b} for b in branches],
            "model": MODEL,
            "precision": {"dtype": "fp32"},
            "grpo": {
                "group_size": GROUP,
                "prompts_per_step": PROMPTS,
                "max_new_tokens": NEW_TOKENS,
                "micro_batch_size": 16,
                "rollout_batch_size": PROMPTS * GROUP,
                "temperature": 1.0,
                "top_p": 1.0,
                "kl_coef": 0.0,
                "filter_zero_variance": False,
            },
            "opd": {"prompts_per_step": PROMPTS, "samples_per_prompt": 1},
            "optim": {"lr": LR, "min_lr": LR, "warmup_steps": 0},
        },
    )


def _ours_worker(rank: int, world: int, port: int, steps: int, threads: int, out: str, hf: str):
    import torch

    from megatron_copd.runtime.distributed import LaunchEnv, init_distributed

    init_distributed(LaunchEnv(rank, world, rank, "127.0.0.1", port, "local"))
    torch.set_num_threads(threads)
    from megatron_copd.data.prompting import EncodedPrompt
    from megatron_copd.rollout.exchange import score_edges
    from megatron_copd.rollout.scoring import ScoreSpec, score_responses
    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.megatron_state import init_megatron_state
    from megatron_copd.training.branch_model import BranchModel
    from megatron_copd.training.rl_step import RLStep, StepContext
    from megatron_copd.training.schedule import StepPlan
    from megatron_copd.training.topology import Edge

    names = ("student", "teacher")[:world]
    cfg = _config(names)
    groups = build_branch_groups(BranchLayout(names))
    init_megatron_state(groups, 1234)
    branch = BranchModel(cfg, groups, None, total_steps=100)
    if hf:  # the TRL side loads the same weights: the student's export
        _export(branch.model, groups.pgs, cfg, Path(hf), rank)

    class BenchStep(RLStep):
        def _encode(self, records):  # synthetic prompts are token ids already
            return [EncodedPrompt(r.ids, None, r) for r in records]

    step = BenchStep(StepContext(cfg, groups, branch, _Tokenizer(), _Data(), _Rewards(), {}))
    me = groups.branch_name
    result: dict = {}
    if world == 1:  # GRPO: rollout + reward + advantages + update
        plans = [StepPlan(i, 0, 1, i, frozenset([me]), (), (), frozenset([me])) for i in range(steps)]
    else:  # OPD: the student distils from the teacher branch (which does not train)
        edge = Edge("student", "teacher")
        plans = [StepPlan(i, 0, 2, i, frozenset(["student"]), (edge,), (), frozenset())
                 for i in range(steps)]
    times = []
    for plan in plans:
        t0 = time.perf_counter()
        metrics, _ = step.run(plan)
        times.append(time.perf_counter() - t0)
    result["step_s"] = times
    result["parts_s"] = {k: metrics[k] for k in ("rollout_s", "train_s") if k in metrics}
    if os.environ.get("RL_STEP_PROFILE"):  # one more step under cProfile (every rank runs it)
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        step.run(plans[-1])
        prof.disable()
        if rank == 0:
            pstats.Stats(prof).sort_stats(os.environ["RL_STEP_PROFILE"]).print_stats(60)
    if world == 2:  # cross-branch teacher scoring vs a local forward of the same tokens
        ro = step._sample(_Data()._batch(PROMPTS), 1, 7, topk=cfg.opd.topk)
        spec = ScoreSpec(topk=cfg.opd.topk, entropy=False)
        cross, local = [], []
        for _ in range(5):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            score_edges(branch.model, groups, [Edge("student", "teacher")],
                        {Edge("student", "teacher"): ro} if me == "student" else {},
                        spec=spec, micro_batch_size=16)
            cross.append(time.perf_counter() - t0)
            torch.distributed.barrier()
            t0 = time.perf_counter()
            score_responses(branch.model, groups.pgs, ro.sample_prompts(), ro.responses(),
                            spec=spec, micro_batch_size=16)
            local.append(time.perf_counter() - t0)
        result["cross_score_s"], result["local_score_s"] = cross, local
        result["scored_tokens"] = int(ro.lengths.sum())
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def _export(model, pgs, cfg, path: Path, rank: int) -> None:
    import torch.distributed as dist

    from megatron_copd.checkpoint.meta import make_meta
    from megatron_copd.checkpoint.model_io import save_model
    from megatron_copd.models.conversion.hf_export import convert_to_hf

    ckpt = save_model(model, pgs, path / "ckpt", make_meta(cfg.model, "bench", None))
    if rank == 0:
        convert_to_hf(ckpt, path / "hf", with_tokenizer=False)
    dist.barrier()


def run_ours(world: int, steps: int, threads: int, hf: str = "") -> dict:
    import torch.multiprocessing as mp

    from megatron_copd.runtime.distributed import free_port

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    mp.start_processes(_ours_worker, args=(world, free_port(), steps, threads, out, hf),
                       nprocs=world, start_method="spawn")
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


# --------------------------------------------------------------------------- TRL
TRL_VENV = ROOT / ".venv-trl"


def ensure_trl_venv() -> Path:
    py = TRL_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        site = subprocess.run([str(py), "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        import site as this_site

        ours = [p for p in this_site.getsitepackages() if p.endswith("site-packages")][0]
        Path(site, "_project_venv.pth").write_text(ours + "\n")
        subprocess.run([str(py), "-m", "pip", "install", "-q", "trl"], check=True)
    return py


def _trl_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1",
                                   unk_token="t2")
    fast.padding_side = "left"
    return fast


def trl_worker(kind: str, hf_dir: str, steps: int, threads: int, out: str) -> None:
    import torch
    import transformers
    from datasets import Dataset
    from transformers import TrainerCallback

    import trl

    torch.set_num_threads(threads)
    tok = _trl_tokenizer()
    texts = [" ".join(f"t{t}" for t in p) for s in range(1, steps + 1) for p in prompts_for(s)]
    data = Dataset.from_dict({"prompt": texts})
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    common = dict(output_dir=tempfile.mkdtemp(prefix="trl-bench-"), max_steps=steps,
                  learning_rate=LR, lr_scheduler_type="constant", bf16=False, use_cpu=True,
                  report_to=[], logging_steps=1000, save_strategy="no", seed=0,
                  gradient_checkpointing=False, temperature=1.0, top_p=1.0, top_k=0,
                  max_completion_length=NEW_TOKENS,
                  generation_kwargs={"min_new_tokens": NEW_TOKENS}, dataloader_num_workers=0,
                  disable_tqdm=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    if kind == "grpo":
        def reward(completion_ids, **kw):
            return [even_share(ids) for ids in completion_ids]

        args = trl.GRPOConfig(per_device_train_batch_size=16, gradient_accumulation_steps=GROUP,
                              num_generations=GROUP, beta=0.0, shuffle_dataset=False, **common)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args,
                                  train_dataset=data,
                                  processing_class=tok, callbacks=[Timer()])
    else:
        teacher = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        args = trl.DistillationConfig(per_device_train_batch_size=PROMPTS,
                                      gradient_accumulation_steps=1, shuffle_dataset=False,
                                      beta=1.0, **common)
        trainer = trl.DistillationTrainer(model=model, teacher_model=teacher, args=args,
                                          train_dataset=data, processing_class=tok,
                                          callbacks=[Timer()])
    trainer.train()
    Path(out).write_text(json.dumps({"step_s": times, "trl": trl.__version__}))


def run_trl(kind: str, hf_dir: str, steps: int, threads: int) -> dict:
    py = ensure_trl_venv()
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([str(py), __file__, "--trl-worker", kind, hf_dir, str(steps), str(threads), out],
                   check=True, env=env)
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


# --------------------------------------------------------------------------- report
def median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--trl-worker":
        kind, hf_dir, steps, threads, out = sys.argv[2:7]
        trl_worker(kind, hf_dir, int(steps), int(threads), out)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="steps per method (the first is warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--no-trl", action="store_true", help="only the project's steps")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="rl-step-bench-")
    hf = str(Path(tmp.name))
    grpo = run_ours(1, args.steps, args.threads, "" if args.no_trl else hf)
    opd = run_ours(2, args.steps, args.threads)
    rows = [("GRPO step", grpo), ("OPD step", opd)]
    trl_rows = {}
    if not args.no_trl:
        trl_rows["GRPO step"] = run_trl("grpo", str(Path(hf, "hf")), args.steps, args.threads)
        trl_rows["OPD step"] = run_trl("opd", str(Path(hf, "hf")), args.steps, args.threads)
    print(f"torch threads per process: {args.threads}; {args.steps} steps each, median after "
          f"one warm-up step (s)")
    if trl_rows:
        print(f"TRL {next(iter(trl_rows.values()))['trl']}")
    print(f"{'':<10} {'ours':>8} {'TRL':>8} {'ours/TRL':>9}")
    for name, ours in rows:
        o = median_after_warmup(ours["step_s"])
        t = median_after_warmup(trl_rows[name]["step_s"]) if name in trl_rows else float("nan")
        parts = ", ".join(f"{k} {v:.3f}" for k, v in ours["parts_s"].items())
        print(f"{name:<10} {o:>8.3f} {t:>8.3f} {o / t:>9.2f}   (ours, last step: {parts})")
    cross = median_after_warmup(opd["cross_score_s"])
    local = median_after_warmup(opd["local_score_s"])
    n = opd["scored_tokens"]
    print(f"teacher scoring of {n} response tokens: cross-branch {cross * 1e3:.1f} ms, local "
          f"{local * 1e3:.1f} ms, cross/local {cross / local:.2f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
