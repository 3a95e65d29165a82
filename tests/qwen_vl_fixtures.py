"""A tiny Qwen3-VL or Qwen2.5-VL built by transformers from a config (random weights, no hub),
hand-made multimodal batches for it, and a megatron worker that loads the converted weights at
TP/PP."""

from __future__ import annotations

from pathlib import Path

import torch
from hf_fixtures import _randomise

VOCAB = 300
IMAGE, VIDEO, V_START, V_END = 290, 291, 292, 293
PATCH_DIM = 3 * 2 * 16 * 16
PATCH_DIM_25 = 3 * 2 * 14 * 14
# A case's media, in QwenVisualInputs' field order (Qwen2.5-VL video cases carry the seconds per
# temporal patch).
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
              "second_per_grid_ts")


def config(deepstack=(0, 1), depth: int = 2, tie: bool = True, layers: int = 4):
    import transformers as T

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                bos_token_id=1, eos_token_id=2, pad_token_id=3)
    vision = dict(depth=depth, hidden_size=32, num_heads=2, intermediate_size=64,
                  out_hidden_size=64, patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                  num_position_embeddings=64, deepstack_visual_indexes=list(deepstack))
    return T.Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                           video_token_id=VIDEO, vision_start_token_id=V_START,
                           vision_end_token_id=V_END, tie_word_embeddings=tie)


def config25(depth: int = 4, fullatt=(1, 3), tie: bool = False, layers: int = 4):
    """A tiny Qwen2.5-VL: 14-pixel patches, 56-pixel windows (2 x 2 merged tokens), so the
    cases' images span several windows of different sizes."""
    import transformers as T

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-6, tie_word_embeddings=tie,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3]},
                bos_token_id=1, eos_token_id=2, pad_token_id=3)
    vision = dict(depth=depth, hidden_size=32, num_heads=2, intermediate_size=48,
                  out_hidden_size=64, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                  window_size=56, fullatt_block_indexes=list(fullatt), tokens_per_second=2)
    return T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                              video_token_id=VIDEO, vision_start_token_id=V_START,
                              vision_end_token_id=V_END, tie_word_embeddings=tie)


def build(cfg, seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    cls = (T.Qwen3VLForConditionalGeneration if cfg.model_type == "qwen3_vl"
           else T.Qwen2_5_VLForConditionalGeneration)
    model = cls(cfg)
    _randomise(model, seed)
    return model.eval()


def _text(g, n):
    return torch.randint(4, 280, (n,), generator=g).tolist()


def _media(token, grid):
    t, h, w = grid
    return [V_START] + [token] * (t * h * w // 4) + [V_END]


def make_case(name: str, seed: int = 0, version: str = "qwen3_vl") -> dict:
    """Rows of token ids (left-padded to one length) with their images / video frames.

    text: two text rows; image: one 4x4-patch image; two_images: a 4x4 and a 6x4 image in one
    row; video: a 2-frame video (two 2-frame temporal patches), for Qwen3-VL written per frame
    with a timestamp, as its template does (Qwen2.5-VL: one run); mixed: a batch of an image
    row, a video row and a text row of different lengths (left padding). Qwen2.5-VL's images
    are larger (8x6 and 6x10 patches), so that they span windows of different sizes."""
    g = torch.Generator().manual_seed(seed)
    rows, images, videos = [], [], []
    if version == "qwen2_5_vl":
        return _case25(name, g)
    if name == "text":
        rows = [_text(g, 12), _text(g, 12)]
    elif name == "image":
        images = [(1, 4, 4)]
        rows = [_text(g, 3) + _media(IMAGE, images[0]) + _text(g, 6)]
    elif name == "two_images":
        images = [(1, 4, 4), (1, 6, 4)]
        rows = [_text(g, 2) + _media(IMAGE, images[0]) + _text(g, 3) + _media(IMAGE, images[1])
                + _text(g, 4)]
    elif name == "video":
        videos = [(2, 4, 4)]
        frame = (1, 4, 4)
        rows = [_text(g, 2) + _text(g, 2) + _media(VIDEO, frame) + _text(g, 2)
                + _media(VIDEO, frame) + _text(g, 5)]
    elif name == "mixed":
        images, videos = [(1, 4, 6)], [(2, 4, 4)]
        rows = [_text(g, 2) + _media(IMAGE, images[0]) + _text(g, 3),
                _text(g, 1) + _media(VIDEO, (1, 4, 4)) + _text(g, 1) + _media(VIDEO, (1, 4, 4))
                + _text(g, 2),
                _text(g, 5)]
    else:
        raise ValueError(name)
    return _batch(rows, images, videos, g, PATCH_DIM)


def _case25(name: str, g) -> dict:
    rows, images, videos = [], [], []
    if name == "text":
        rows = [_text(g, 12), _text(g, 12)]
    elif name == "image":
        images = [(1, 8, 6)]
        rows = [_text(g, 3) + _media(IMAGE, images[0]) + _text(g, 6)]
    elif name == "two_images":
        images = [(1, 4, 4), (1, 6, 10)]
        rows = [_text(g, 2) + _media(IMAGE, images[0]) + _text(g, 3) + _media(IMAGE, images[1])
                + _text(g, 4)]
    elif name == "video":  # 0.75 s per temporal patch: positions step 1.5 -> 0, 1, 3
        videos, seconds = [(3, 4, 6)], [0.75]
        rows = [_text(g, 4) + _media(VIDEO, videos[0]) + _text(g, 5)]
    elif name == "mixed":  # 2.5 s per temporal patch: the temporal positions run ahead
        images, videos, seconds = [(1, 4, 6)], [(2, 6, 4)], [2.5]
        rows = [_text(g, 2) + _media(IMAGE, images[0]) + _text(g, 3),
                _text(g, 1) + _media(VIDEO, videos[0]) + _text(g, 2),
                _text(g, 5)]
    else:
        raise ValueError(name)
    batch = _batch(rows, images, videos, g, PATCH_DIM_25)
    if videos:
        batch["second_per_grid_ts"] = torch.tensor(seconds)
    return batch


def _batch(rows, images, videos, g, patch_dim: int) -> dict:
    s = max(len(r) for r in rows)
    ids = torch.full((len(rows), s), 3, dtype=torch.long)
    mask = torch.zeros(len(rows), s, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, s - len(r):] = torch.tensor(r)
        mask[i, s - len(r):] = 1

    def pixels(grids):
        if not grids:
            return None, None
        n = sum(t * h * w for t, h, w in grids)
        return torch.randn(n, patch_dim, generator=g), torch.tensor(grids)

    pv, ig = pixels(images)
    pvv, vg = pixels(videos)
    return {"ids": ids, "mask": mask, "pixel_values": pv, "image_grid_thw": ig,
            "pixel_values_videos": pvv, "video_grid_thw": vg}


def hf_logits(model, case: dict) -> torch.Tensor:
    types = torch.zeros_like(case["ids"])
    types[case["ids"] == IMAGE] = 1
    types[case["ids"] == VIDEO] = 2
    kw = {k: case[k] for k in MEDIA_KEYS if case.get(k) is not None}
    with torch.no_grad():
        out = model(input_ids=case["ids"], attention_mask=case["mask"], mm_token_type_ids=types,
                    **kw)
    return out.logits.float()


def import_checkpoint(hf_model, root: Path) -> tuple[Path, Path]:
    """save_pretrained + tools' import: (the HF directory, the torch_dist checkpoint)."""
    from megatron_copd.models.conversion.hf_import import import_from_hf

    hf_dir = root / "hf"
    hf_model.save_pretrained(str(hf_dir))
    import_from_hf(hf_dir, root / "ckpt")
    return hf_dir, root / "ckpt"


def load_world_model(world: int, ckpt: str, tp: int = 1, pp: int = 1, names=("a",)):
    """(model, groups, meta): the model ``ckpt``'s meta describes, built at TP x PP for the
    branches ``names`` (each loading ``ckpt``), fp32, in eval mode."""
    from megatron_copd.checkpoint.model_io import load_model
    from megatron_copd.checkpoint.meta import read_meta
    from megatron_copd.config import RunConfig
    from megatron_copd.config_base import from_dict
    from megatron_copd.models.factory import build_model
    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.megatron_state import init_megatron_state

    meta = read_meta(ckpt)
    cfg = from_dict(RunConfig, {"branches": [{"name": n} for n in names],
                                "parallel": {"tp": tp, "pp": pp}, "precision": {"dtype": "fp32"},
                                "model": meta["model"]})
    groups = build_branch_groups(BranchLayout.from_world(tuple(names), world, tp=tp, pp=pp))
    init_megatron_state(groups, 7)
    model = build_model(cfg, groups.pgs).eval()
    load_model(model, groups.pgs, ckpt, process_group=groups.branch_group)
    return model, groups, meta


def megatron_logits(rank, world, tp: int, pp: int, ckpt: str, cases: list[dict],
                    save: str | None = None):
    """Load ``ckpt`` into the model its meta describes at TP x PP, return full logits for each
    case (last stage; None elsewhere); re-save the model to ``save`` when given."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_copd.checkpoint.model_io import save_model
    from megatron_copd.models.qwen_vl.media import QwenVisualInputs
    from megatron_copd.models.qwen_vl.positions import mrope_position_ids

    model, groups, meta = load_world_model(world, ckpt, tp, pp)
    if save:
        save_model(model, groups.pgs, save, meta)
    spec = model.spec
    out = []
    for case in cases:
        ids, mask = case["ids"], case["mask"]
        seconds = case.get("second_per_grid_ts")
        pos, _ = mrope_position_ids(ids, spec, case["image_grid_thw"], case["video_grid_thw"],
                                    mask, None if seconds is None else seconds.tolist())
        s = ids.shape[1]
        causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
        attn = (causal[None] | ~mask.bool()[:, None, :]).unsqueeze(1)
        media = QwenVisualInputs(case["pixel_values"], case["image_grid_thw"],
                                 case["pixel_values_videos"], case["video_grid_thw"])
        with torch.no_grad():
            if pp == 1:
                full = model(ids, pos, attn, pixels=media)
            else:
                full = _pipeline_forward(model, groups, ids, pos, attn, media)
        if full is not None:
            full = gather_from_tensor_model_parallel_region(full, group=groups.pgs.tp)
        out.append(full)
    return out


def _pipeline_forward(model, groups, ids, pos, attn, media):
    """One forward through the stages by hand (send / recv of the hidden states)."""
    import torch.distributed as dist

    pp = groups.pgs.pp
    rank, size = pp.rank(), pp.size()
    ranks = dist.get_process_group_ranks(pp)
    if rank > 0:
        h = model.config.hidden_size
        buf = torch.empty(ids.shape[1], ids.shape[0], h)
        dist.recv(buf, src=ranks[rank - 1], group=pp)
        model.set_input_tensor(buf)
    out = model(ids, pos, attn, pixels=media if rank == 0 else None)
    if rank < size - 1:
        dist.send(out.contiguous(), dst=ranks[rank + 1], group=pp)
        return None
    return out


def hf_greedy(model, case: dict, row: int, n_new: int) -> list[int]:
    """transformers' greedy ``generate`` of one row (its real tokens and its own media)."""
    real = case["mask"][row].bool()
    ids = case["ids"][row][real].unsqueeze(0)
    sub = media_of_rows(case, [row])
    types = torch.zeros_like(ids)
    types[ids == IMAGE] = 1
    types[ids == VIDEO] = 2
    kw = {k: getattr(sub, k) for k in MEDIA_KEYS if sub is not None and
          getattr(sub, k) is not None}
    if "second_per_grid_ts" in kw:
        kw["second_per_grid_ts"] = kw["second_per_grid_ts"].float()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             mm_token_type_ids=types, max_new_tokens=n_new, do_sample=False,
                             suppress_tokens=[IMAGE, VIDEO], eos_token_id=2, pad_token_id=3,
                             **kw)
    new = out[0, ids.shape[1]:].tolist()
    return new[:new.index(2) + 1] if 2 in new else new


def media_of_rows(case: dict, rows: list[int]):
    from megatron_copd.models.qwen_vl.media import QwenVisualInputs
    from megatron_copd.models.qwen_vl.spec import spec_from_model

    media = QwenVisualInputs(*(case.get(k) for k in MEDIA_KEYS))
    spec = spec_from_model(_model_config())
    seqs = [case["ids"][r][case["mask"][r].bool()].tolist() for r in range(len(case["ids"]))]
    return media.select(media.per_sequence(seqs, spec), rows)


def _model_config():
    from megatron_copd.models.qwen_vl.hf_config import qwen_vl_from_hf

    return qwen_vl_from_hf(config().to_dict()).model


def megatron_greedy(rank, world, tp: int, pp: int, ckpt: str, case: dict, n_new: int):
    """The project's rollout ``generate`` (KV cache, left-padded batch of all rows) at TP x PP,
    greedy: each row's new tokens up to and including EOS (id 2)."""
    from megatron_copd.rollout.generation import generate
    from megatron_copd.rollout.sampling import SamplingParams

    model, groups, _ = load_world_model(world, ckpt, tp, pp)
    rows = list(range(len(case["ids"])))
    prompts = [case["ids"][r][case["mask"][r].bool()].tolist() for r in rows]
    ro = generate(model, groups.pgs, prompts,
                  SamplingParams(max_new_tokens=n_new, temperature=0.0, stop_ids=(2,)),
                  pixels=media_of_rows(case, rows), pad_id=3)
    return [ro.tokens[i, :ro.lengths[i]].tolist() for i in rows]


def megatron_exchange(rank, world, pp: int, ckpt: str, case: dict):
    """Two branches (same weights) at PP=pp: each samples 2 responses per row of ``case``
    with its media, scores them locally (``score_responses``) and has the peer score them
    through ``score_edges`` (prompts, grids and patch rows cross branches). On the last stage:
    the samples, the rollout's, the local and the peer's log-probs."""
    from megatron_copd.rollout.exchange import Edge, score_edges
    from megatron_copd.rollout.generation import generate
    from megatron_copd.rollout.sampling import SamplingParams
    from megatron_copd.rollout.scoring import score_responses

    model, g, _ = load_world_model(world, ckpt, pp=pp, names=("a", "b"))
    rows = list(range(len(case["ids"])))
    prompts = [case["ids"][r][case["mask"][r].bool()].tolist() for r in rows]
    ro = generate(model, g.pgs, prompts,
                  SamplingParams(max_new_tokens=6, temperature=1.0, seed=11 + g.branch),
                  pixels=media_of_rows(case, rows), samples_per_prompt=2, pad_id=3)
    local = score_responses(model, g.pgs, ro.sample_prompts(), ro.responses(),
                            pixels=ro.sample_pixels(), pad_id=3)
    other = 1 - g.branch
    got = score_edges(model, g, [(0, 1), (1, 0)], {Edge(g.branch, other): ro}, pad_id=3)
    if not g.is_last_stage:
        return None
    peer = got[Edge(g.branch, other)].logprobs
    return {"prompts": ro.sample_prompts(), "responses": ro.responses(),
            "rollout": ro.logprobs, "local": local.logprobs, "peer": peer,
            "lengths": ro.lengths, "index": ro.prompt_index}


def hf_response_logprobs(model, case: dict, row: int, response: list[int]) -> torch.Tensor:
    """transformers' log-probs of ``response`` after row ``row``'s prompt and media."""
    real = case["mask"][row].bool()
    prompt = case["ids"][row][real]
    ids = torch.cat([prompt, torch.tensor(response)]).unsqueeze(0)
    sub = media_of_rows(case, [row])
    one = {"ids": ids, "mask": torch.ones_like(ids),
           **{k: None if sub is None else getattr(sub, k) for k in
              MEDIA_KEYS}}
    logp = torch.log_softmax(hf_logits(model, one)[0], dim=-1)
    p = prompt.numel()
    return logp[p - 1:p - 1 + len(response)].gather(1, torch.tensor(response)[:, None])[:, 0]


def megatron_grads(rank, world, ckpt: str, case: dict, w: torch.Tensor):
    """Gradients of sum(logits * w) over the real positions of ``case`` (TP=1, training mode)
    for a few parameters of the vision tower, DeepStack and the language model."""
    from megatron_copd.models.qwen_vl.media import QwenVisualInputs
    from megatron_copd.models.qwen_vl.positions import mrope_position_ids

    model, _, _ = load_world_model(world, ckpt)
    model.train()
    ids, mask = case["ids"], case["mask"]
    pos, _ = mrope_position_ids(ids, model.spec, case["image_grid_thw"], case["video_grid_thw"], mask)
    s = ids.shape[1]
    attn = (torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None] | ~mask.bool()[:, None, :]).unsqueeze(1)
    media = QwenVisualInputs(case["pixel_values"], case["image_grid_thw"], case["pixel_values_videos"], case["video_grid_thw"])
    out = model(ids, pos, attn, pixels=media)
    loss = (out[mask.bool()] * w).sum()
    loss.backward()
    v = model.vision_model
    return {"patch": v.patch_weight.grad.clone(), "pos": v.pos_embed.weight.grad.clone(),
            "ds_fc1": v.deepstack_merger0.mlp.encoder.linear_fc1.weight.grad.clone(),
            "emb": model.language_model.embedding.word_embeddings.weight.grad.clone(),
            "blk0_fc2": v.decoder.layers[0].mlp.linear_fc2.weight.grad.clone()}
