"""Rollout, scoring and cross-branch exchange at TP=2, PP=2, DP=2 and K=2/4 branches.

One world of 4 gloo processes runs every layout in turn (process start-up dominates the cost):

* one branch TP2xDP2 vs TP1xDP4 (same seed = same weights): sampling (VLM, images), sequence
  parallel, scoring against a full-vocabulary reference, gradients of the vocab-parallel log-prob
  and entropy functions, and of a log-prob loss through the model;
* one branch PP2xDP2 vs PP1 and TP2xPP2 vs TP2xPP1 (weights copied stage by stage);
* exchange: K=2 x TP2, K=2 x PP2, K=2 x DP2, and K=4 hub-and-spoke plus extra edges; the scores a
  student receives equal its own scoring with the teacher's weights built locally.
"""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from harness import run_world
from rollout_util import IMAGE_TOKEN, VOCAB, build, copy_stage_weights, groups, prompts_for

from megatron_copd.rollout import vocab_parallel as vp
from megatron_copd.rollout.exchange import Edge, score_edges
from megatron_copd.rollout.generation import generate
from megatron_copd.rollout.sampling import SamplingParams, derive_seed
from megatron_copd.rollout.scoring import ScoreSpec, score_responses

R = 6
SPEC = ScoreSpec(topk=5, entropy=True, topk_logprobs=True)


def _vlm_inputs(seed: int):
    prompts = prompts_for(seed, 4)
    prompts[1] = prompts[1][:2] + [IMAGE_TOKEN] * 4 + prompts[1][2:]
    prompts[3] = [IMAGE_TOKEN] * 8 + prompts[3]
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return prompts, pixels


def _rollout(model, g, seed, vision=True, g_samples=2, fast=True):
    prompts, pixels = _vlm_inputs(seed) if vision else (prompts_for(seed, 4), None)
    params = SamplingParams(
        max_new_tokens=R, seed=seed, temperature=0.9, top_p=0.95, stop_ids=tuple(range(6, 40))
    )
    return generate(
        model,
        g.pgs,
        prompts,
        params,
        pixels=pixels,
        samples_per_prompt=g_samples,
        kv_batch_size=4,
        fast_decode=fast,
    )


def _fast_vs_slow(model, g, seed, fast_ro):
    """The fast decode step vs megatron's on the same weights and seed, and the fast path's
    log-probs vs a full recompute (scoring) of the sampled sequences."""
    slow = _rollout(model, g, seed, fast=False)
    same = all(
        torch.equal(getattr(fast_ro, k), getattr(slow, k)) for k in ("tokens", "lengths", "finished")
    )
    out = {"same": same, "lp": (fast_ro.logprobs - slow.logprobs).abs().max().item()}
    sc = _score(model, g, fast_ro)
    if sc is not None:  # last pipeline stage
        mask = torch.arange(R)[None] < fast_ro.lengths[:, None]
        out["lp_vs_recompute"] = _diff(fast_ro.logprobs, sc.logprobs, mask)
    return out


def _score(model, g, ro):
    return score_responses(
        model,
        g.pgs,
        ro.sample_prompts(),
        ro.responses(),
        pixels=ro.sample_pixels(),
        spec=SPEC,
        micro_batch_size=3,
    )


def _diff(a, b, mask):
    """Max |a - b| over the masked (valid response) entries."""
    if mask.dim() < a.dim():
        mask = mask[..., None]
    return ((a.float() - b.float()).abs() * mask).max().item()


def _score_diffs(got, ref, lengths):
    mask = torch.arange(got.logprobs.shape[1])[None] < lengths[:, None]
    return {
        "lp": _diff(got.logprobs, ref.logprobs, mask),
        "entropy": _diff(got.entropy, ref.entropy, mask),
        "topk_lp": _diff(got.topk_logprobs, ref.topk_logprobs, mask),
        "topk_ids": bool((got.topk_ids == ref.topk_ids)[mask].all()),
    }


def _switch_on_sequence_parallel(model):
    """Sequence parallelism on the language model after construction (megatron's CPU norms
    refuse to be built with it; their forward is per token, so it runs)."""
    model.config.sequence_parallel = True
    for module in model.language_model.modules():
        if isinstance(getattr(module, "sequence_parallel", None), bool):
            module.sequence_parallel = True


def _tp_checks(rank, out):
    g2 = groups(tp=2)
    g1 = groups(tp=1)
    m2 = build(g2, 21, tp=2, vision=True)
    m1 = build(g1, 21, tp=1, vision=True)
    # sampling: same tokens, log-probs at TP=2 and TP=1; TP partners agree bit for bit
    ro2, ro1 = _rollout(m2, g2, 3), _rollout(m1, g1, 3)
    out["tp_tokens_equal"] = torch.equal(ro2.tokens, ro1.tokens)
    out["tp_lp"] = (ro2.logprobs - ro1.logprobs).abs().max().item()
    out["tp_tokens"] = ro2.tokens
    out["tp_fast_vs_slow"] = _fast_vs_slow(m2, g2, 3, ro2)
    out["tp_lengths"] = ro2.lengths
    # sequence parallel model (same weights): rollout switches SP off, scoring pads for it
    msp = build(g2, 21, tp=2, vision=True)
    _switch_on_sequence_parallel(msp)
    ro_sp = _rollout(msp, g2, 3)
    out["sp_tokens_equal"] = torch.equal(ro_sp.tokens, ro1.tokens)
    out["sp_restored"] = (
        msp.config.sequence_parallel and msp.language_model.output_layer.sequence_parallel
    )
    # scoring at TP=2 vs the same weights at TP=1 with a full-vocabulary reference
    ref = _score(m1, g1, ro1)
    out["tp_score"] = _score_diffs(_score(m2, g2, ro1), ref, ro1.lengths)
    out["sp_score"] = _score_diffs(_score(msp, g2, ro1), ref, ro1.lengths)
    batch = ro1.pack()
    logits = m1(batch.tokens, batch.position_ids, batch.attention_mask, pixels=ro1.sample_pixels())
    lsm = batch.response_values(torch.log_softmax(logits.double(), -1))
    ref_lp = lsm.gather(-1, batch.response_values(batch.labels)[..., None])[..., 0]
    mask = torch.arange(R)[None] < ro1.lengths[:, None]
    out["tp1_score_vs_torch"] = _diff(ref.logprobs, ref_lp, mask)

    # gradients of the vocab-parallel functions (shards) vs full-vocabulary autograd
    tp_rank, shard = g2.tp_rank, VOCAB // 2
    gen = torch.Generator().manual_seed(7)
    full = torch.randn(3, 5, VOCAB, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, VOCAB, (3, 5), generator=gen)
    w1, w2 = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    f = full.clone().requires_grad_()
    ref_lsm = torch.log_softmax(f, -1)
    ref_loss = (w1 * ref_lsm.gather(-1, targets[..., None])[..., 0]).sum() + (
        w2 * -(ref_lsm.exp() * ref_lsm).sum(-1)
    ).sum()
    ref_loss.backward()
    part = full[..., tp_rank * shard : (tp_rank + 1) * shard].float().clone().requires_grad_()
    loss = (w1 * vp.token_logprobs(part, targets, g2.pgs.tp)).sum() + (
        w2 * vp.entropy(part, g2.pgs.tp)
    ).sum()
    loss.backward()
    out["grad_fn_loss"] = abs(loss.item() - ref_loss.item())
    out["grad_fn"] = (
        (part.grad.double() - f.grad[..., tp_rank * shard : (tp_rank + 1) * shard])
        .abs()
        .max()
        .item()
    )
    out["grad_fn_scale"] = f.grad.abs().max().item()

    # a log-prob loss through the model: gradients at TP=2 equal TP=1
    grads = {}
    for name, m, g in (("tp2", m2, g2), ("tp1", m1, g1)):
        m.train()
        m.zero_grad()
        logits = m(
            batch.tokens, batch.position_ids, batch.attention_mask, pixels=ro1.sample_pixels()
        )
        lp = vp.token_logprobs(logits, batch.labels, g.pgs.tp)
        (-(lp * batch.loss_mask).sum()).backward()
        lm = m.language_model
        grads[name] = (
            lm.decoder.final_layernorm.weight.grad.clone(),
            lm.embedding.word_embeddings.weight.grad.clone(),
        )
        m.eval()
    rows = slice(tp_rank * shard, (tp_rank + 1) * shard)
    out["grad_model_norm"] = (grads["tp2"][0] - grads["tp1"][0]).abs().max().item()
    out["grad_model_emb"] = (grads["tp2"][1] - grads["tp1"][1][rows]).abs().max().item()
    out["grad_model_scale"] = grads["tp1"][1].abs().max().item()


def _pp_checks(rank, out):
    gp = groups(pp=2)
    g1 = groups(pp=1)
    m1 = build(g1, 31, vision=True)
    mp = build(gp, 99, pp=2, vision=True)
    copy_stage_weights(mp, m1, gp.pp_rank, 2)
    ro_p, ro_1 = _rollout(mp, gp, 4), _rollout(m1, g1, 4)
    out["pp_tokens_equal"] = torch.equal(ro_p.tokens, ro_1.tokens)
    out["pp_lp"] = (ro_p.logprobs - ro_1.logprobs).abs().max().item()
    out["pp_fast_vs_slow"] = _fast_vs_slow(mp, gp, 4, ro_p)
    sp = _score(mp, gp, ro_1)
    out["pp_score_none_on_first_stage"] = (sp is None) == gp.is_first_stage
    if sp is not None:
        out["pp_score"] = _score_diffs(sp, _score(m1, g1, ro_1), ro_1.lengths)

    # TP2 x PP2 (whole world) vs TP2 x PP1
    gtp = groups(tp=2, pp=2)
    gt1 = groups(tp=2)
    mt1 = build(gt1, 41, tp=2, vision=True)
    mtp = build(gtp, 98, tp=2, pp=2, vision=True)
    copy_stage_weights(mtp, mt1, gtp.pp_rank, 2)
    a, b = _rollout(mtp, gtp, 5), _rollout(mt1, gt1, 5)
    out["tppp_tokens_equal"] = torch.equal(a.tokens, b.tokens)
    out["tppp_lp"] = (a.logprobs - b.logprobs).abs().max().item()
    out["tppp_fast_vs_slow"] = _fast_vs_slow(mtp, gtp, 5, a)


def _exchange(rank, names, edges, tp=1, pp=1, vision=True):
    """Every branch samples, all edges are scored at once; compare with local references."""
    g = groups(names=names, tp=tp, pp=pp)
    seeds = [100 + 17 * b for b in range(len(names))]
    model = build(g, seeds[g.branch], tp=tp, pp=pp, vision=vision)
    ro = _rollout(model, g, derive_seed(g.branch, g.dp_rank), vision=vision)
    mine = {Edge(s, t): ro for s, t in edges if s == g.branch}
    stats = {}
    got = score_edges(model, g, edges, mine, spec=SPEC, micro_batch_size=3, stats=stats)
    res = {
        "branch": g.branch,
        "stage_last": g.is_last_stage,
        "edges": sorted(got),
        "stats": stats,
        "tp_rank": g.tp_rank,
        "pp_rank": g.pp_rank,
        "dp_rank": g.dp_rank,
        "n_resp_tokens": int(ro.lengths.sum()),
        "n_samples": ro.num_samples,
        "n_prompt_tokens": sum(len(p) for p in ro.prompts),
        "diffs": {},
    }
    for e in sorted(mine):
        teacher = build(g, seeds[e.teacher], tp=tp, pp=pp, vision=vision)
        ref = _score(teacher, g, ro)  # collective over the pipeline: every stage calls it
        if ref is not None:
            d = _score_diffs(got[e], ref, ro.lengths)
            width = ro.tokens.shape[1]
            pad = torch.arange(width)[None] >= ro.lengths[:, None]
            d["pad_ids"] = bool((got[e].topk_ids[pad] == -1).all())
            # a different teacher would give different numbers: the check can fail
            d["differs_from_own"] = _diff(ro.logprobs, got[e].logprobs, ~pad)
            res["diffs"][(e.student, e.teacher)] = d
    dist.barrier()
    return res


def _parallel_worker(rank, world):
    out = {}
    _tp_checks(rank, out)
    _pp_checks(rank, out)
    pair = [(0, 1), (1, 0)]
    out["x_tp2"] = _exchange(rank, ("a", "b"), pair, tp=2)
    out["x_pp2"] = _exchange(rank, ("a", "b"), pair, pp=2)
    out["x_dp2"] = _exchange(rank, ("a", "b"), pair, vision=False)
    hub = [(1, 0), (2, 0), (3, 0), (0, 1), (0, 2), (0, 3), (1, 2), (3, 2)]
    out["x_hub"] = _exchange(rank, ("h", "s1", "s2", "s3"), hub)
    return out


@pytest.fixture(scope="module")
def reports():
    return run_world(_parallel_worker, 4)


def test_tp2_generates_the_same_tokens_as_tp1(reports):
    for r in reports:
        assert r["tp_tokens_equal"] and r["tp_lp"] <= 1e-5
        assert r["sp_tokens_equal"] and r["sp_restored"]
    # TP partners (ranks 0/1 and 2/3) hold identical rollouts
    for a, b in ((0, 1), (2, 3)):
        assert torch.equal(reports[a]["tp_tokens"], reports[b]["tp_tokens"])
        assert torch.equal(reports[a]["tp_lengths"], reports[b]["tp_lengths"])
    assert (reports[0]["tp_lengths"] < R).any()  # stop ids were exercised


def test_scoring_at_tp2_matches_full_vocab_reference(reports):
    for r in reports:
        assert r["tp1_score_vs_torch"] <= 1e-5
        for key in ("tp_score", "sp_score"):
            d = r[key]
            assert d["lp"] <= 1e-5 and d["entropy"] <= 1e-5 and d["topk_lp"] <= 1e-5, (key, d)
            assert d["topk_ids"], key


def test_logprob_gradient_at_tp2_matches_reference(reports):
    for r in reports:
        assert r["grad_fn_loss"] <= 1e-4
        assert r["grad_fn"] <= 1e-6 and r["grad_fn_scale"] > 1e-3
        assert r["grad_model_norm"] <= 1e-5
        assert r["grad_model_emb"] <= 1e-5 and r["grad_model_scale"] > 1e-4


def test_pp2_generates_and_scores_like_pp1(reports):
    for r in reports:
        assert r["pp_tokens_equal"] and r["pp_lp"] <= 1e-5
        assert r["pp_score_none_on_first_stage"]
        if "pp_score" in r:
            d = r["pp_score"]
            assert d["lp"] <= 1e-5 and d["entropy"] <= 1e-5 and d["topk_ids"]
        assert r["tppp_tokens_equal"] and r["tppp_lp"] <= 1e-5


def _check_exchange(results, edges):
    by_branch = {}
    for r in results:
        by_branch.setdefault(r["branch"], []).append(r)
        own_edges = sorted((s, t) for s, t in edges if s == r["branch"])
        if r["stage_last"]:
            assert [(e.student, e.teacher) for e in r["edges"]] == own_edges
            assert sorted(r["diffs"]) == own_edges
        else:
            assert r["edges"] == [] and r["diffs"] == {}
        for edge, d in r["diffs"].items():
            assert d["lp"] <= 1e-5 and d["entropy"] <= 1e-5 and d["topk_lp"] <= 1e-5, (edge, d)
            assert d["topk_ids"] and d["pad_ids"], edge
            assert d["differs_from_own"] > 1e-3, edge
    return by_branch


def test_exchange_pair_with_tp2(reports):
    results = [r["x_tp2"] for r in reports]
    _check_exchange(results, [(0, 1), (1, 0)])
    for r in results:  # only TP-rank-0 peers cross branches
        if r["tp_rank"] == 1:
            assert r["stats"] == {}
        else:
            assert r["stats"]["bytes_sent"] > 0 and r["stats"]["bytes_received"] > 0


def test_exchange_pair_with_pp2(reports):
    _check_exchange([r["x_pp2"] for r in reports], [(0, 1), (1, 0)])


def test_exchange_pair_with_dp2_sends_only_what_is_needed(reports):
    results = [r["x_dp2"] for r in reports]
    _check_exchange(results, [(0, 1), (1, 0)])
    for r in results:
        # request: header (11 x int64) + int32 (prompt lengths, sample->prompt, response lengths, tokens);
        # reply: float32 log-probs + entropy + top-k log-probs, int16 top-k ids
        m, k = r["n_resp_tokens"], SPEC.topk
        n_prompts = 4
        request = 11 * 8 + 4 * (n_prompts + 2 * r["n_samples"] + r["n_prompt_tokens"] + m)
        reply = 4 * m * (2 + k) + 2 * m * k
        peer = next(
            x for x in results if x["branch"] != r["branch"] and x["dp_rank"] == r["dp_rank"]
        )
        peer_request = 11 * 8 + 4 * (
            n_prompts + 2 * peer["n_samples"] + peer["n_prompt_tokens"] + peer["n_resp_tokens"]
        )
        peer_reply = 4 * peer["n_resp_tokens"] * (2 + k) + 2 * peer["n_resp_tokens"] * k
        assert r["stats"]["bytes_sent"] == request + peer_reply
        assert r["stats"]["bytes_received"] == peer_request + reply


def test_exchange_hub_and_spoke_and_extra_edges(reports):
    hub = [(1, 0), (2, 0), (3, 0), (0, 1), (0, 2), (0, 3), (1, 2), (3, 2)]
    by_branch = _check_exchange([r["x_hub"] for r in reports], hub)
    assert len(by_branch) == 4


def test_edge_list_errors():
    from megatron_copd.rollout.exchange import EdgeError, normalize_edges
    from megatron_copd.runtime.branches import BranchLayout

    @dataclasses.dataclass
    class _G:
        layout: BranchLayout

    g = _G(BranchLayout(("a", "b", "c")))
    assert normalize_edges([("b", "a"), (0, 2)], g) == [Edge(0, 2), Edge(1, 0)]
    for bad, msg in (
        ([(0, 0)], "own teacher"),
        ([(0, 3)], "out of range"),
        ([(0, 1), ("a", "b")], "duplicates"),
    ):
        with pytest.raises(EdgeError, match=msg):
            normalize_edges(bad, g)


@pytest.mark.parametrize("layout", ["tp", "pp", "tppp"])
def test_fast_decode_equals_megatron_decode_at_tp2_pp2(reports, layout):
    """The fast decode step (rollout.fast_decode, finished rows leaving the batch) samples what
    megatron's decode step samples, and its log-probs equal a full recompute of the sequences."""
    last_stage_reports = 0
    for r in reports:
        d = r[f"{layout}_fast_vs_slow"]
        assert d["same"] and d["lp"] <= 1e-5, d
        if "lp_vs_recompute" in d:
            last_stage_reports += 1
            assert d["lp_vs_recompute"] <= 1e-5, d
    assert last_stage_reports >= 2
