"""One CoPD step on one rank: native GRPO samples, cross-branch OPD samples, one update.

Per step (every rank of the world runs the same sequence of collectives):
1. native batch (branches in ``plan.native``): prompts from D_k -> G rollouts each with the
   branch's own model -> verifiable rewards -> group-normalised advantages;
2. OPD batch (branches that are students of an active or probed edge): prompts from the
   teacher's data -> rollouts with the student's policy;
3. ``score_edges``: every teacher scores its students' rollouts with its current weights;
   students receive per-token log-probs and top-k ids, and compute A_t = beta (log pi_T -
   log pi_S), the top-k overlap and the symmetric KL;
4. update (branches in ``plan.trains``): native + OPD samples in one clipped-surrogate batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_copd.algorithms.grpo import group_advantages, zero_variance_groups
from megatron_copd.algorithms.opd import mopd_advantages, opd_advantages
from megatron_copd.algorithms.overlap import symmetric_kl_estimate, topk_overlap
from megatron_copd.data.prompting import EncodedPrompt, encode_prompt
from megatron_copd.models.precision import sequence_multiple
from megatron_copd.rollout import inputs
from megatron_copd.rollout.exchange import score_edges
from megatron_copd.rollout.positions import position_ids
from megatron_copd.rollout.scoring import ScoreSpec
from megatron_copd.rollout.generation import Rollout, generate
from megatron_copd.rollout.sampling import SamplingParams, derive_seed
from megatron_copd.training.branch_data import BranchData, dp_share
from megatron_copd.training.losses import policy_loss
from megatron_copd.training.samples import SampleSet, build_micro_batches
from megatron_copd.training.schedule import StepPlan
from megatron_copd.training.topology import Edge


@dataclass
class StepContext:
    """Everything a step needs that lives for the whole run."""

    cfg: object  # RunConfig
    groups: object  # BranchGroups
    branch: object  # BranchModel
    tokenizer: object
    data: BranchData
    rewards: object  # RewardPool
    encode_cache: dict


class RLStep:
    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        cfg = ctx.cfg
        self.name = ctx.groups.branch_name
        self.index = ctx.groups.branch
        self.tok = ctx.tokenizer
        self.pad_id = ctx.tokenizer.pad_id
        self.stop_ids = (ctx.tokenizer.eos_id,)
        self.loss_fn = policy_loss(
            ctx.groups.pgs.tp, cfg.grpo.eps_low, cfg.grpo.eps_high, cfg.grpo.kl_coef
        )
        self.beta = cfg.branch(self.name).beta

    # ------------------------------------------------------------------ helpers
    def _encode(self, records) -> list[EncodedPrompt]:
        cache = self.ctx.encode_cache
        out = []
        for r in records:
            key = (r.domain, r.id)
            if key not in cache:
                cfg = self.ctx.cfg
                cache[key] = encode_prompt(
                    r, self.tok, cfg.model.vision_side, cfg.data.max_prompt_tokens
                )
            out.append(cache[key])
        return out

    def _sample(self, records, samples: int, seed: int, topk: int = 0) -> Rollout:
        g = self.ctx.cfg.grpo
        enc = self._encode(records)
        pixels = [e.pixels for e in enc if e.pixels is not None]
        params = SamplingParams(
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            top_k=g.top_k,
            stop_ids=self.stop_ids,
            seed=seed,
        )
        return generate(
            self.ctx.branch.model,
            self.ctx.groups.pgs,
            [e.token_ids for e in enc],
            params,
            pixels=inputs.concat_media(pixels),
            samples_per_prompt=samples,
            kv_batch_size=g.rollout_batch_size,
            pad_id=self.pad_id,
            topk=topk,
        )

    def _rewards(self, records, rollout: Rollout, samples: int) -> tuple[torch.Tensor, dict]:
        """Verifier rewards, computed once per model-parallel group and broadcast to it."""
        groups = self.ctx.groups
        mp = groups.pgs.mp
        n = rollout.num_samples
        rewards = torch.zeros(n, dtype=torch.float32)
        stats = torch.zeros(2, dtype=torch.float32)
        if mp.rank() == 0:
            items = []
            default = self.ctx.cfg.grpo.default_verifier
            for i, resp in enumerate(rollout.responses()):
                rec = records[i // samples]
                text = self.tok.decode([t for t in resp if t not in self.stop_ids])
                items.append((rec.reward or default, text, rec.answer))
            result = self.ctx.rewards.score(items)
            rewards = torch.tensor(result.rewards, dtype=torch.float32)
            stats = torch.tensor([result.num_errors, result.num_timeouts], dtype=torch.float32)
        if mp.size() > 1:
            src = dist.get_process_group_ranks(mp)[0]
            dist.broadcast(rewards, src=src, group=mp)
            dist.broadcast(stats, src=src, group=mp)
        return rewards, {"reward_errors": float(stats[0]), "reward_timeouts": float(stats[1])}

    def _seed(self, step: int, stream: int) -> int:
        g = self.ctx.groups
        return derive_seed(self.ctx.cfg.seed, step, self.index, g.dp_rank, stream)

    # ------------------------------------------------------------------ the step
    def run(self, plan: StepPlan) -> tuple[dict, dict[Edge, dict]]:
        """Returns (branch metrics, per-edge metrics for edges where this branch is student)."""
        cfg = self.ctx.cfg
        g = cfg.grpo
        groups = self.ctx.groups
        dp_rank, dp_size = groups.dp_rank, groups.pgs.dp.size()
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        samples = SampleSet()
        trains = self.name in plan.trains

        # 1. native GRPO batch
        if self.name in plan.native:
            records = dp_share(self.ctx.data.native_batch(g.prompts_per_step), dp_rank, dp_size)
            ro = self._sample(records, g.group_size, self._seed(plan.step, 0))
            rewards, rstats = self._rewards(records, ro, g.group_size)
            adv = group_advantages(rewards, g.group_size, g.adv_eps)
            keep = torch.ones(ro.num_samples, dtype=torch.bool)
            zero_var = zero_variance_groups(rewards, g.group_size)
            if g.filter_zero_variance:
                keep = ~zero_var.repeat_interleave(g.group_size)
            samples.add_rollout(ro, adv.unsqueeze(1).expand(-1, ro.tokens.shape[1]), keep)
            metrics.update(rstats)
            metrics["reward_mean"] = float(rewards.mean())
            metrics["zero_variance_groups"] = float(zero_var.sum())
            metrics["response_len"] = float(ro.lengths.float().mean())

        # 2. OPD rollouts on the teachers' prompts (active and probed edges)
        my_edges = [e for e in (*plan.edges, *plan.probe_edges) if e.student == self.name]
        rollouts: dict[Edge, tuple[list, Rollout]] = {}
        for k, e in enumerate(my_edges):
            records = dp_share(
                self.ctx.data.peer_batch(e.teacher, cfg.opd.prompts_per_step), dp_rank, dp_size
            )
            ro = self._sample(records, cfg.opd.samples_per_prompt, self._seed(plan.step, 1 + k),
                              topk=cfg.opd.topk)
            rollouts[e] = (records, ro)

        # 3. teacher scoring across branches (collective over the world)
        edge_metrics: dict[Edge, dict] = {}
        all_edges = sorted({*plan.edges, *plan.probe_edges})
        if all_edges:
            scores = score_edges(
                self.ctx.branch.model,
                groups,
                all_edges,
                {e: ro for e, (_, ro) in rollouts.items()},
                spec=ScoreSpec(topk=cfg.opd.topk, entropy=False),
                micro_batch_size=g.micro_batch_size,
                pad_id=self.pad_id,
            )
            for e, (records, ro) in rollouts.items():
                ts = _lookup(scores, groups, e)
                if ts is None:  # not the last pipeline stage: nothing to train on here
                    continue
                mask = _response_mask(ro)
                em = {
                    "overlap_top10": float(topk_overlap(ro.topk_ids, ts.topk_ids, mask)),
                    "sym_kl": float(symmetric_kl_estimate(ro.logprobs, ts.logprobs, mask).symmetric),
                }
                if e in plan.edges:
                    if cfg.schedule.recipe == "mopd" and cfg.opd.orm_alpha:
                        s = cfg.opd.samples_per_prompt
                        rw, _ = self._rewards(records, ro, s)
                        orm = group_advantages(rw, s, g.adv_eps)
                        adv = mopd_advantages(
                            ts.logprobs, ro.logprobs, orm, cfg.opd.orm_alpha, mask
                        )
                    else:
                        adv = opd_advantages(ts.logprobs, ro.logprobs, self.beta, mask)
                    em["opd_advantage_mean"] = float((adv * mask).sum() / mask.sum().clamp(min=1))
                    samples.add_rollout(ro, adv, torch.ones(ro.num_samples, dtype=torch.bool))
                edge_metrics[e] = em
        rollout_s = time.perf_counter() - t0

        # 4. the update
        if trains and len(samples):
            t1 = time.perf_counter()
            batches, seq_len = build_micro_batches(
                samples, g.micro_batch_size, self.pad_id, pad_to=sequence_multiple(cfg),
                positions=partial(position_ids, self.ctx.branch.model),
                max_tokens=g.max_tokens_per_micro_batch,
            )
            result = self.ctx.branch.train_step(batches, self.loss_fn, seq_len)
            metrics.update(result.metrics)
            metrics["grad_norm"] = result.grad_norm if result.grad_norm is not None else 0.0
            metrics["lr"] = self.ctx.branch.lr
            metrics["train_s"] = time.perf_counter() - t1
            tokens = samples.num_tokens()
            metrics["tokens_per_s"] = tokens / max(1e-9, time.perf_counter() - t0)
        metrics["rollout_s"] = rollout_s
        metrics["step_s"] = time.perf_counter() - t0
        return metrics, edge_metrics


def _lookup(scores: dict, groups, e: Edge):
    s, t = groups.layout.branch_index(e.student), groups.layout.branch_index(e.teacher)
    for key, value in scores.items():
        if (key.student, key.teacher) == (s, t):
            return value
    return None


def _response_mask(ro: Rollout) -> torch.Tensor:
    r = ro.tokens.shape[1]
    return torch.arange(r, device=ro.tokens.device)[None, :] < ro.lengths[:, None]
