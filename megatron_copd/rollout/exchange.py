"""Cross-branch teacher scoring: every directed edge of a topology in one collective call.

An edge ``student -> teacher`` means: the student branch has sampled rollouts, the teacher branch
scores them with its *current* weights and sends back per-token log-probs (and top-k ids...).
:func:`score_edges` serves all edges of a step at once — pairs both ways, hub-and-spoke, or any
directed graph where a branch teaches several students and learns from several teachers.

Who talks to whom. Branches have the same TP x CP x DP x PP shape, so rank ``r`` of the student
has a peer ``BranchLayout.peer(r, teacher)`` at the same (tp, dp, pp) position. Only TP-rank-0
peers cross branches (TP partners get the data by a broadcast inside their branch, usually
inside a node), and only what is needed travels:

1. request header (10 x int64): counts and image shape — student stage ``s`` -> teacher stage
   ``s``;
2. request payload: one int32 tensor with the unique prompts (ragged), each sample's prompt
   index, response lengths and response tokens (and a Qwen-VL model's image / video grids, which
   every stage needs for the 3-D positions); the prompts' pixels go to the first stage only
   (the vision tower lives there): ``[n, 3, H, W]`` images, or a Qwen-VL model's patch rows
   ``[rows, patch_dim]`` (images' then videos');
3. every teacher rank (whole TP x PP pipeline) scores through megatron's forward-only schedule;
4. reply: teacher last stage -> student last stage, response positions only (``sum(lengths)``
   entries): float32 log-probs, top-k ids as int16 when the vocabulary fits (else int32),
   optional float32 top-k log-probs / entropy. Sizes are known to the student, so no header.

Deadlock freedom. In each of the three transfer phases every rank posts all its sends and
receives of that phase together (``batch_isend_irecv`` over the cross-branch group) and then
waits; every posted send has its matching receive posted in the same phase, so no wait can
block on a peer that is itself blocked. Between phases there are only collectives inside a
branch (TP broadcasts, the teacher's scoring), which every rank of that branch runs in the same
order (edges sorted). Scoring of a branch never waits on another branch.

The call is collective over the whole world: every rank calls it with the same edge list.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_copd.errors import UserError
from megatron_copd.models.qwen_vl.media import QwenVisualInputs
from megatron_copd.rollout import inputs, layout
from megatron_copd.rollout.generation import Rollout, model_device
from megatron_copd.rollout.scoring import ScoreSpec, score_packed
from megatron_copd.runtime.branches import BranchGroups
from megatron_copd.runtime.distributed import batch_p2p

# n_prompts, n_samples, n_prompt_tokens, n_response_tokens, n_images (or patch rows), H (or
# patch_dim), W (0: patch rows), dtype, n_image_grids, n_video_grids, 1 if the videos' seconds
# per temporal patch follow the grids (float32 bits)
_HEADER = 11
_PIXEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.uint8)
_WARM_GROUPS: set[int] = set()
TEACHER_SPEC = ScoreSpec(topk=10, entropy=False)
"""Default teacher reply: log-probs and the top-10 ids (what OPD and the overlap metric use)."""


class EdgeError(UserError, ValueError):
    """A distillation edge list that cannot be served."""


@dataclass(frozen=True, order=True)
class Edge:
    """``student`` rolls out, ``teacher`` scores (branch indices)."""

    student: int
    teacher: int


@dataclass
class TeacherScores:
    """The teacher's view of a student's rollouts, aligned with ``Rollout.tokens [N, R]``.

    Entries past a sample's length are 0 (log-probs, entropy) and -1 (top-k ids).
    """

    teacher: int
    lengths: torch.Tensor  # [N]
    logprobs: torch.Tensor  # [N, R] float32: log pi_teacher(y_t)
    topk_ids: torch.Tensor | None = None  # [N, R, k] int64, teacher's most likely tokens
    topk_logprobs: torch.Tensor | None = None  # [N, R, k] float32
    entropy: torch.Tensor | None = None  # [N, R] float32


def normalize_edges(edges: Iterable, groups: BranchGroups) -> list[Edge]:
    """Edges given as objects with ``student``/``teacher`` (this module's ``Edge`` or the
    topology's), or ``(student, teacher)`` pairs, by index or branch name -> sorted Edges."""
    layout_ = groups.layout
    out = []
    for e in edges:
        s, t = (e.student, e.teacher) if hasattr(e, "student") else tuple(e)
        s = layout_.branch_index(s) if isinstance(s, str) else int(s)
        t = layout_.branch_index(t) if isinstance(t, str) else int(t)
        for b in (s, t):
            if not 0 <= b < layout_.num_branches:
                raise EdgeError(f"edge {e}: branch {b} out of range [0, {layout_.num_branches})")
        if s == t:
            raise EdgeError(f"edge {e}: a branch cannot be its own teacher")
        out.append(Edge(s, t))
    if len(set(out)) != len(out):
        raise EdgeError(f"edges: duplicates in {[(e.student, e.teacher) for e in out]}")
    return sorted(out)


def _ids_dtype(vocab_size: int) -> torch.dtype:
    return torch.int16 if vocab_size <= torch.iinfo(torch.int16).max + 1 else torch.int32


class _Transfer:
    """Collects one phase's point-to-point ops, then posts them together and waits."""

    def __init__(self, group: dist.ProcessGroup, stats: dict[str, int] | None) -> None:
        self.group = group
        self.stats = stats if stats is not None else {}
        self.ops: list[dist.P2POp] = []

    def _count(self, key: str, tensor: torch.Tensor) -> None:
        self.stats[key] = self.stats.get(key, 0) + tensor.numel() * tensor.element_size()

    def send(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        if tensor.numel():
            self._count("bytes_sent", tensor)
            self.ops.append(dist.P2POp(dist.isend, tensor.contiguous(), peer, self.group, tag))

    def recv(self, tensor: torch.Tensor, peer: int, tag: int) -> torch.Tensor:
        if tensor.numel():
            self._count("bytes_received", tensor)
            self.ops.append(dist.P2POp(dist.irecv, tensor, peer, self.group, tag))
        return tensor

    def run(self) -> None:
        # batch_p2p stages CUDA tensors through host memory when the backend is gloo (ranks
        # sharing a GPU); with NCCL it is batch_isend_irecv + wait.
        batch_p2p(self.ops)
        self.ops = []


@dataclass
class _Request:
    """A student's rollouts as they travel (built on the student, rebuilt on the teacher)."""

    header: torch.Tensor  # [_HEADER] int64
    ints: torch.Tensor  # int32 payload
    pixels: torch.Tensor | None

    @classmethod
    def from_rollout(cls, ro: Rollout, device: torch.device) -> _Request:
        prompt_lens = [len(p) for p in ro.prompts]
        lengths = ro.lengths.to(device)
        flat_prompts = [t for p in ro.prompts for t in p]
        resp = layout.ragged_values(ro.tokens.to(device), lengths)
        ints = torch.cat(
            [
                torch.tensor(prompt_lens, dtype=torch.int32, device=device),
                ro.prompt_index.to(device=device, dtype=torch.int32),
                lengths.to(torch.int32),
                torch.tensor(flat_prompts, dtype=torch.int32, device=device),
                resp.to(torch.int32),
            ]
        )
        pix, grids = ro.pixels, (0, 0, 0)
        if isinstance(pix, QwenVisualInputs):
            image_g, video_g = pix.image_grid_thw, pix.video_grid_thw
            seconds = pix.second_per_grid_ts if video_g is not None else None
            grids = (0 if image_g is None else len(image_g), 0 if video_g is None else len(video_g),
                     int(seconds is not None))
            flat = [g.reshape(-1) for g in (image_g, video_g) if g is not None]
            if seconds is not None:
                flat.append(seconds.to(device=device, dtype=torch.float32).view(torch.int32))
            ints = torch.cat([ints, *(g.to(device=device, dtype=torch.int32) for g in flat)])
            rows = [v for v in (pix.pixel_values, pix.pixel_values_videos) if v is not None]
            pix = torch.cat(rows) if rows else None
        n_img = 0 if pix is None else pix.shape[0]
        h, w = 0, 0
        if n_img:  # [n, 3, H, W] images, or Qwen-VL patch rows [rows, patch_dim] (W = 0)
            h, w = (pix.shape[2], pix.shape[3]) if pix.dim() == 4 else (pix.shape[1], 0)
        code = _PIXEL_DTYPES.index(pix.dtype) if n_img else 0
        header = torch.tensor(
            [len(ro.prompts), ro.num_samples, len(flat_prompts), resp.numel(), n_img, h, w, code,
             *grids],
            dtype=torch.int64,
            device=device,
        )
        return cls(header, ints, pix.to(device) if n_img else None)

    @staticmethod
    def ints_size(header: torch.Tensor) -> int:
        n_p, n_s, n_pt, n_rt = (int(x) for x in header[:4])
        return (n_p + 2 * n_s + n_pt + n_rt + 3 * int(header[8] + header[9])
                + int(header[9]) * int(header[10]))

    @staticmethod
    def pixel_shape(header: torch.Tensor) -> tuple[list[int], torch.dtype]:
        n_img, h, w, code = (int(x) for x in header[4:8])
        return ([n_img, 3, h, w] if w else [n_img, h]), _PIXEL_DTYPES[code]

    def media(self):
        """The prompts' media as the model takes them: the image tensor, or a Qwen-VL model's
        QwenVisualInputs (grids on every stage, patch rows where they were sent)."""
        n_ig, n_vg = int(self.header[8]), int(self.header[9])
        if not n_ig and not n_vg:
            return self.pixels
        n_sec = n_vg * int(self.header[10])
        end = self.ints.numel() - n_sec
        seconds = (self.ints[end:].contiguous().view(torch.float32).double() if n_sec else None)
        grids = self.ints[end - 3 * (n_ig + n_vg):end].long().view(-1, 3)
        image_g, video_g = grids[:n_ig], grids[n_ig:]
        values = videos = None
        if self.pixels is not None:
            split = int(image_g.prod(-1).sum())
            values, videos = self.pixels[:split], self.pixels[split:]
        return QwenVisualInputs(values if n_ig else None, image_g if n_ig else None,
                                videos if n_vg else None, video_g if n_vg else None, seconds)

    def unpack(self) -> tuple[list[list[int]], list[int], list[list[int]]]:
        """-> unique prompts, sample -> prompt index, responses."""
        n_p, n_s = int(self.header[0]), int(self.header[1])
        vals = self.ints.long().tolist()
        prompt_lens = vals[:n_p]
        index = vals[n_p : n_p + n_s]
        resp_lens = vals[n_p + n_s : n_p + 2 * n_s]
        rest = vals[n_p + 2 * n_s :]
        prompts, pos = [], 0
        for n in prompt_lens:
            prompts.append(rest[pos : pos + n])
            pos += n
        responses = []
        for n in resp_lens:
            responses.append(rest[pos : pos + n])
            pos += n
        return prompts, index, responses


def _reply_tensors(
    m: int, spec: ScoreSpec, ids_dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Receive buffers of a reply with ``m`` response tokens (the order is the wire order)."""
    out = {"logprobs": torch.empty(m, dtype=torch.float32, device=device)}
    if spec.entropy:
        out["entropy"] = torch.empty(m, dtype=torch.float32, device=device)
    if spec.topk:
        out["topk_ids"] = _to_wire(torch.empty(m, spec.topk, dtype=ids_dtype, device=device))
        if spec.topk_logprobs:
            out["topk_logprobs"] = torch.empty(m, spec.topk, dtype=torch.float32, device=device)
    return out


def _to_wire(ids: torch.Tensor) -> torch.Tensor:
    """int16 ids travel as their bytes: neither NCCL nor gloo collectives take int16."""
    return ids.view(torch.uint8) if ids.dtype == torch.int16 else ids


def _from_wire(ids: torch.Tensor) -> torch.Tensor:
    return (ids.view(torch.int16) if ids.dtype == torch.uint8 else ids).long()


def _warm_up(group: dist.ProcessGroup, device: torch.device) -> None:
    # NCCL wants every member in a group's first batched P2P call; a collective first makes the
    # communicator exist on all of them (a branch may have no edge in a given call).
    if id(group) not in _WARM_GROUPS:
        dist.all_reduce(torch.zeros(1, device=device), group=group)
        _WARM_GROUPS.add(id(group))


@dataclass
class _Ctx:
    """What every phase of one ``score_edges`` call needs about this rank."""

    groups: BranchGroups
    device: torch.device
    spec: ScoreSpec
    ids_dtype: torch.dtype
    stats: dict[str, int] | None

    @property
    def tp(self) -> dist.ProcessGroup:
        return self.groups.pgs.tp

    @property
    def tp_src(self) -> int:
        return dist.get_process_group_ranks(self.tp)[0]

    @property
    def is_tp0(self) -> bool:
        return self.groups.tp_rank == 0

    def transfer(self) -> _Transfer:
        return _Transfer(self.groups.cross_group, self.stats)

    def tag(self, e: Edge, i: int) -> int:
        """Distinct per edge and message (gloo matches messages of one pair by tag)."""
        return (e.student * self.groups.layout.num_branches + e.teacher) * 32 + i

    def empty_header(self) -> torch.Tensor:
        return torch.empty(_HEADER, dtype=torch.int64, device=self.device)


def score_edges(
    model,
    groups: BranchGroups,
    edges: Iterable,
    rollouts: Mapping[Edge, Rollout],
    *,
    spec: ScoreSpec = TEACHER_SPEC,
    micro_batch_size: int = 16,
    pad_id: int = 0,
    stats: dict[str, int] | None = None,
) -> dict[Edge, TeacherScores]:
    """Serve every edge: send my branch's rollouts to my teachers' matching ranks, score the
    rollouts my students sent me with ``model`` (this branch's current weights), and return the
    scores my teachers computed for my rollouts.

    ``rollouts``: for each edge where this rank's branch is the student, the rollouts to be
    scored (``Edge(student, teacher)`` keys; every rank of the branch passes the same ones).
    Returns ``{edge: TeacherScores}`` for those edges on the student's last pipeline stage (where
    the loss is computed; every TP rank there gets them) and ``{}`` on other stages.
    Collective over the world. ``stats``, if given, accumulates this rank's cross-branch
    ``bytes_sent`` / ``bytes_received``.
    """
    edge_list = normalize_edges(edges, groups)
    facts = inputs.ModelFacts.of(model)
    as_student = [e for e in edge_list if e.student == groups.branch]
    as_teacher = [e for e in edge_list if e.teacher == groups.branch]
    keyed = {normalize_edges([k], groups)[0]: v for k, v in rollouts.items()}
    for e in as_student:  # validate before any communication
        if e not in keyed:
            raise EdgeError(f"edge {e.student}->{e.teacher}: no rollouts given by the student")
        inputs.check_tokens(
            keyed[e].responses(), facts, "response", allow_empty=True, allow_image_tokens=False
        )
    ctx = _Ctx(groups, model_device(model), spec, _ids_dtype(facts.vocab_size), stats)
    _warm_up(groups.cross_group, ctx.device)

    outgoing = {e: _Request.from_rollout(keyed[e], ctx.device) for e in as_student}
    incoming = _exchange_requests(ctx, outgoing, as_teacher)
    replies = {
        e: _score_request(model, ctx, incoming[e], facts, micro_batch_size, pad_id)
        for e in as_teacher
    }
    if not groups.is_last_stage:
        return {}
    sizes = {e: int(outgoing[e].header[3]) for e in as_student}
    received = _exchange_replies(ctx, replies, sizes)
    return {e: _teacher_scores(e, keyed[e], received[e]) for e in as_student}


def _exchange_requests(
    ctx: _Ctx, outgoing: dict[Edge, _Request], as_teacher: list[Edge]
) -> dict[Edge, _Request]:
    """Phase 1: headers, then payloads, between TP-rank-0 peers at the same pipeline stage
    (pixels only to the first stage); then rank 0 of each teacher TP group shares them."""
    g, first = ctx.groups, ctx.groups.is_first_stage
    incoming = {e: _Request(ctx.empty_header(), torch.empty(0), None) for e in as_teacher}
    if ctx.is_tp0:
        ph = ctx.transfer()
        for e, req in outgoing.items():
            ph.send(req.header, g.peer(e.teacher), ctx.tag(e, 0))
        for e, req in incoming.items():
            ph.recv(req.header, g.peer(e.student), ctx.tag(e, 0))
        ph.run()
        for e, req in outgoing.items():
            ph.send(req.ints, g.peer(e.teacher), ctx.tag(e, 1))
            if first and req.pixels is not None:
                ph.send(req.pixels, g.peer(e.teacher), ctx.tag(e, 2))
        for e, req in incoming.items():
            req.ints = torch.empty(
                _Request.ints_size(req.header), dtype=torch.int32, device=ctx.device
            )
            ph.recv(req.ints, g.peer(e.student), ctx.tag(e, 1))
            shape, dtype = _Request.pixel_shape(req.header)
            if first and shape[0]:
                req.pixels = torch.empty(shape, dtype=dtype, device=ctx.device)
                ph.recv(req.pixels, g.peer(e.student), ctx.tag(e, 2))
        ph.run()
    if ctx.tp.size() > 1:
        for req in incoming.values():
            dist.broadcast(req.header, src=ctx.tp_src, group=ctx.tp)
            if not ctx.is_tp0:
                req.ints = torch.empty(
                    _Request.ints_size(req.header), dtype=torch.int32, device=ctx.device
                )
            if req.ints.numel():
                dist.broadcast(req.ints, src=ctx.tp_src, group=ctx.tp)
            shape, dtype = _Request.pixel_shape(req.header)
            if first and shape[0]:
                if not ctx.is_tp0:
                    req.pixels = torch.empty(shape, dtype=dtype, device=ctx.device)
                dist.broadcast(req.pixels, src=ctx.tp_src, group=ctx.tp)
    return incoming


def _exchange_replies(
    ctx: _Ctx, replies: dict[Edge, dict[str, torch.Tensor]], sizes: dict[Edge, int]
) -> dict[Edge, dict[str, torch.Tensor]]:
    """Phase 3 (last stage only): teacher TP-rank-0 -> student TP-rank-0, whose TP group then
    gets the reply by broadcast. ``sizes``: response tokens of each of my student edges."""
    g = ctx.groups
    received = {e: _reply_tensors(m, ctx.spec, ctx.ids_dtype, ctx.device) for e, m in sizes.items()}
    if ctx.is_tp0:
        ph = ctx.transfer()
        for e, reply in replies.items():
            for i, t in enumerate(reply.values()):
                ph.send(t, g.peer(e.student), ctx.tag(e, 3 + i))
        for e, bufs in received.items():
            for i, t in enumerate(bufs.values()):
                ph.recv(t, g.peer(e.teacher), ctx.tag(e, 3 + i))
        ph.run()
    if ctx.tp.size() > 1:
        for bufs in received.values():
            for t in bufs.values():
                if t.numel():
                    dist.broadcast(t, src=ctx.tp_src, group=ctx.tp)
    return received


def _score_request(
    model,
    ctx: _Ctx,
    req: _Request,
    facts: inputs.ModelFacts,
    micro_batch_size: int,
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """Phase 2: this branch's whole pipeline scores one student's rollouts; on the last stage
    the reply tensors (response positions only, wire dtypes), elsewhere ``{}``."""
    if int(req.header[3]) == 0:  # nothing to score (every rank of the branch agrees)
        return {}
    prompts, index, responses = req.unpack()
    rows = [prompts[i] for i in index]
    batch = layout.pack(rows, responses, pad_id=pad_id)
    media = req.media()
    if facts.qwen_vl is not None:
        counts = inputs.images_per_sequence(prompts, media, facts, "prompt")
    elif facts.tokens_per_image and facts.image_token_id is not None:
        counts = [p.count(facts.image_token_id) // facts.tokens_per_image for p in prompts]
    else:
        counts = [0] * len(prompts)
    pixels = inputs.select_images(media, counts, index) if media is not None else None
    spec = ctx.spec
    scores = score_packed(
        model,
        ctx.groups.pgs,
        batch,
        pixels,
        [counts[i] for i in index],
        spec=spec,
        micro_batch_size=micro_batch_size,
        start=batch.prompt_width - 1,
    )
    if scores is None:  # not the last stage: nothing to send
        return {}
    lengths = batch.response_lens.to(scores.logprobs.device)
    out = {"logprobs": layout.ragged_values(scores.logprobs, lengths)}
    if spec.entropy:
        out["entropy"] = layout.ragged_values(scores.entropy, lengths)
    if spec.topk:
        ids = layout.ragged_values(scores.topk_ids, lengths).to(ctx.ids_dtype)
        out["topk_ids"] = _to_wire(ids)
        if spec.topk_logprobs:
            out["topk_logprobs"] = layout.ragged_values(scores.topk_logprobs, lengths)
    return out


def _teacher_scores(e: Edge, ro: Rollout, reply: dict[str, torch.Tensor]) -> TeacherScores:
    lengths = ro.lengths
    width = ro.tokens.shape[1]

    def unflat(name: str, fill):
        t = reply.get(name)
        if t is None:
            return None
        if name == "topk_ids":
            t = _from_wire(t)
        return layout.unragged_values(t, lengths, width, fill)

    return TeacherScores(
        teacher=e.teacher,
        lengths=lengths,
        logprobs=unflat("logprobs", 0.0),
        topk_ids=unflat("topk_ids", -1),
        topk_logprobs=unflat("topk_logprobs", 0.0),
        entropy=unflat("entropy", 0.0),
    )


__all__: Sequence[str] = ("Edge", "EdgeError", "TeacherScores", "normalize_edges", "score_edges")
