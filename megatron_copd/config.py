"""The run configuration: one tree of dataclasses, loaded from YAML plus ``key=value`` overrides.

Sections: model (+vision), parallel, precision, branches, schedule, grpo, opd, optim, data,
checkpoint, logging, eval. Everything is validated in :func:`load_config` before any process
group exists; errors are one line naming the key.

Why not subclass megatron's TransformerConfig directly: it carries hundreds of fields, its
``__post_init__`` needs the parallel sizes and device facts, and users edit a dozen of them. The
mapping from these sections to TransformerConfig is one function (``models.factory``), and
``model.extra`` passes any further TransformerConfig field through unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megatron_copd.config_base import (
    ConfigError,
    apply_override,
    from_dict,
    load_yaml,
    parse_override,
    to_dict,
)
from megatron_copd.config_checks import check_field, check_fields

__all__ = ["ConfigError", "RunConfig", "load_config", "to_dict"]


@dataclass
class VisionConfig:
    """CLIP-style ViT encoder + MLP projector (LLaVA layout). Video = a sequence of frames."""

    image_size: int = 32
    """Square input resolution in pixels; images are resized to this."""
    patch_size: int = 8
    """ViT patch size in pixels (divides image_size)."""
    hidden_size: int = 64
    """ViT width."""
    num_layers: int = 2
    """ViT layers."""
    num_attention_heads: int = 4
    """ViT heads."""
    ffn_hidden_size: int = 128
    """ViT MLP size."""
    class_token: bool = False
    """Prepend a class token (CLIP) — adds one embedding per image."""
    max_frames: int = 4
    """Frames sampled from a video; each frame is encoded like an image."""

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + (1 if self.class_token else 0)


@dataclass
class QwenVLConfig:
    """The Qwen-VL vision side: native-resolution ViT (Conv3d patches, 2-D rotary positions, 2x2
    merger), multimodal RoPE and the media token ids. Set it (instead of ``model.vision``) to
    build a Qwen-VL model; the decoder is the one above (family qwen3 for Qwen3-VL, qwen2 for
    Qwen2.5-VL)."""

    version: Literal["qwen3_vl", "qwen2_5_vl"] = "qwen3_vl"
    """qwen3_vl: LayerNorm / GELU tower, learned positions, DeepStack, interleaved MRoPE, a
    timestamp per video frame; qwen2_5_vl: RMSNorm / SwiGLU tower with windowed attention
    (full attention in ``fullatt_block_indexes``), block MRoPE, video time in positions."""
    depth: int = 2
    """Vision transformer layers."""
    hidden_size: int = 32
    """Vision width."""
    num_heads: int = 2
    """Vision attention heads (head size a multiple of 4: 2-D RoPE)."""
    intermediate_size: int = 64
    """Vision MLP size (tanh-GELU)."""
    patch_size: int = 16
    """Spatial patch size in pixels."""
    temporal_patch_size: int = 2
    """Frames per patch (an image is repeated to fill them)."""
    spatial_merge_size: int = 2
    """Patches merged per side into one language-model token (2: 2x2 -> 1)."""
    num_position_embeddings: int = 64
    """Learned vision positions: a square table, bilinearly resampled to each image's grid."""
    deepstack_visual_indexes: list[int] = field(default_factory=list)
    """Vision layers whose merged features are added to decoder layers 0, 1, ... (DeepStack)."""
    rope_theta: float = 10000.0
    """Base of the vision tower's 2-D rotary embedding."""
    mrope_section: list[int] = field(default_factory=lambda: [24, 20, 20])
    """Rotary frequency pairs of the decoder driven by the t, h, w positions (sum head_dim/2)."""
    mrope_interleaved: bool = True
    """Qwen3-VL's interleaved t/h/w frequencies (false: three blocks, as Qwen2-VL)."""
    image_token_id: int = 151655
    """Placeholder token of one merged image token."""
    video_token_id: int = 151656
    """Placeholder token of one merged video-frame token."""
    vision_start_token_id: int = 151652
    """Token that opens an image / video frame."""
    vision_end_token_id: int = 151653
    """Token that closes an image / video frame."""
    min_pixels: int = 65536
    """Images with fewer pixels are enlarged (aspect kept) by the image processor."""
    max_pixels: int = 16777216
    """Pixel budget per image: a larger image is refused (one line naming the record)."""
    max_frames: int = 32
    """Most frames taken from one video (evenly spread; padded to a multiple of
    temporal_patch_size)."""
    video_fps: float = 2.0
    """Frames per second sampled from a video file (transformers' video processor's ``fps``);
    a video given as a list of frame files is taken as sampled at this rate."""
    video_min_pixels: int = 4096
    """Videos with fewer pixels are enlarged by the video processor (its ``size.shortest_edge``:
    over all frames for Qwen3-VL, per frame for Qwen2.5-VL)."""
    video_max_pixels: int = 25165824
    """Videos with more pixels are shrunk by the video processor (its ``size.longest_edge``:
    over all frames for Qwen3-VL, per frame for Qwen2.5-VL)."""
    window_size: int = 112
    """qwen2_5_vl: side in pixels of the square windows vision attention stays inside."""
    fullatt_block_indexes: list[int] = field(default_factory=list)
    """qwen2_5_vl: vision layers that attend over the whole frame instead of a window."""
    tokens_per_second: float = 2.0
    """qwen2_5_vl: temporal position step per second of video (x seconds per temporal patch)."""


@dataclass
class ModelConfig:
    """A Qwen3/Llama-shaped decoder (RoPE, RMSNorm, SwiGLU, GQA), optionally with vision."""

    family: Literal["qwen3", "llama", "qwen2"] = "qwen3"
    """qwen3 (QK-norm by default), llama, or qwen2 (bias on Q/K/V; the decoder of Qwen2.5-VL);
    decides defaults and the Hugging Face export."""
    vocab_size: int = 512
    """Embedding rows; >= the tokenizer's vocabulary (the toy tokenizer is trained to this size)."""
    hidden_size: int = 128
    """Width of the language model."""
    num_layers: int = 4
    """Decoder layers (divisible by parallel.pp)."""
    num_attention_heads: int = 4
    """Query heads (divisible by parallel.tp)."""
    num_query_groups: int = 2
    """Key/value heads for grouped-query attention (divides the query heads)."""
    kv_channels: int | None = None
    """Head dimension; default hidden_size / num_attention_heads."""
    ffn_hidden_size: int = 512
    """SwiGLU intermediate size."""
    qk_layernorm: bool | None = None
    """RMSNorm on queries and keys; default true for qwen3, false for llama."""
    tie_embeddings: bool = True
    """Share the input embedding with the output layer."""
    rotary_base: float = 1000000.0
    """RoPE base (theta)."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    max_sequence_length: int = 512
    """Longest prompt + response the model is built for."""
    init_std: float = 0.02
    """Standard deviation of the random init (also the ViT's position embeddings)."""
    vision: VisionConfig | None = None
    """Set to a mapping to build the VLM; null for a text-only LM."""
    qwen_vl: QwenVLConfig | None = None
    """Set to a mapping to build a Qwen-VL model (Qwen3-VL or Qwen2.5-VL); null otherwise."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further megatron TransformerConfig fields, passed through unchanged."""

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def vision_side(self) -> VisionConfig | QwenVLConfig | None:
        """The vision tower's config, whichever kind it is (None: text-only)."""
        return self.vision if self.vision is not None else self.qwen_vl

    @property
    def use_qk_norm(self) -> bool:
        return self.family == "qwen3" if self.qk_layernorm is None else self.qk_layernorm

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2"


@dataclass
class ParallelConfig:
    """Per-branch parallelism. DP is derived: world = branches x TP x CP x DP x PP."""

    tp: int = 1
    """Tensor-parallel size per branch."""
    pp: int = 1
    """Pipeline-parallel size per branch."""
    cp: int = 1
    """Context-parallel size per branch (1: rollout and scoring do not support CP yet)."""
    dp: int | None = None
    """Data-parallel size per branch; null derives it from the world size."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs TP > 1)."""
    distributed_optimizer: bool | None = None
    """Shard optimizer state over DP; default on with CUDA + NCCL, off on CPU/gloo."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation (megatron's recompute_granularity)."""


@dataclass
class PrecisionConfig:
    """Mixed precision. Weights and activations in `dtype`; with bf16/fp16 the optimizer keeps
    fp32 master weights and gradients are reduced in fp32. See docs/GPU.md."""

    dtype: Literal["fp32", "bf16", "fp16"] | None = None
    """Training dtype; default bf16 with CUDA, fp32 on CPU."""
    fp8: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] | None = None
    """FP8 recipe for training GEMMs (Transformer Engine): delayed = delayed scaling,
    tensorwise = per-tensor current scaling, blockwise = 1x128/128x128 block scaling (Hopper,
    CUDA >= 12.9), mxfp8 = MX block scaling (Blackwell only); null disables FP8."""
    fp8_format: Literal["hybrid", "e4m3"] | None = None
    """FP8 formats: hybrid = E4M3 forward, E5M2 gradients; e4m3 everywhere. Default: e4m3 for
    mxfp8, hybrid otherwise."""
    fp8_bf16_edge_layers: int | None = None
    """Keep the first and last N decoder layers in BF16; default 1 for tensorwise, else 0
    (delayed scaling cannot)."""
    fp8_rollout: bool = False
    """Also run rollout / teacher scoring forwards in FP8 (default: BF16)."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """auto = Transformer Engine when CUDA and TE are present, local megatron layers otherwise."""


@dataclass
class BranchConfig:
    name: str
    """Branch name (letters, digits, '-', '_'): used in checkpoints/<name>/ and metrics."""
    domains: list[str] = field(default_factory=list)
    """Data domains this branch trains on (its own D_k); default [name]."""
    train_data: list[str] = field(default_factory=list)
    """JSONL/Parquet prompt files; empty = the toy world's generated data for `domains`."""
    eval_data: list[str] = field(default_factory=list)
    """Held-out JSONL/Parquet files (data.world: files); grouped by each record's domain."""
    beta: float = 1.0
    """OPD advantage scale for this branch as a student (A_t = beta * (log pi_T - log pi_S))."""


@dataclass
class EdgeConfig:
    """Directed distillation edge: `student` rolls out on `teacher`'s prompts, `teacher` scores."""

    student: str
    """The branch that rolls out and learns."""
    teacher: str
    """The branch whose prompts are used and whose current policy scores."""


@dataclass
class ScheduleConfig:
    recipe: Literal["copd", "grpo", "mixed_rlvr", "static_opd", "mopd"] = "copd"
    """copd | grpo | mixed_rlvr | static_opd | mopd (see training/schedule.py)."""
    cycles: int = 2
    """Number of CoPD cycles N (phase I then phase II)."""
    s_rl: int = 3
    """Phase-I GRPO steps per cycle."""
    s_opd: int = 2
    """Phase-II (GRPO + mutual OPD) steps per cycle."""
    steps: int | None = None
    """Total steps for the grpo / mixed_rlvr recipes; default cycles x (s_rl + s_opd)."""
    topology: Literal["pair", "hub", "all", "custom"] = "pair"
    """pair: 2 branches both ways; hub: `hub` <-> every other; all: every ordered pair."""
    hub: str | None = None
    """Hub branch for topology=hub (default: the first branch)."""
    edges: list[EdgeConfig] = field(default_factory=list)
    """Explicit directed edges (topology=custom), or removals via `drop_edges`."""
    drop_edges: list[EdgeConfig] = field(default_factory=list)
    """Edges removed from the topology (the paper's one-direction ablations)."""
    adaptive: bool = False
    """Start phase II when an edge's overlap falls below `overlap_floor`; return above ceiling."""
    overlap_floor: float = 0.85
    """Adaptive rhythm: an edge starts distilling below this top-k overlap."""
    overlap_ceiling: float = 0.95
    """Adaptive rhythm: an edge stops distilling above this top-k overlap."""
    merge_method: Literal["average", "task_arithmetic"] = "average"
    """Final merge of the branches: uniform average, or base + sum of (branch - base) / K."""
    probe_overlap_phase1: bool = False
    """Also measure edge overlap during phase I (costs a peer scoring pass)."""


@dataclass
class GRPOConfig:
    prompts_per_step: int = 8
    """Native prompts per branch and step (divisible by DP); each gets group_size rollouts."""
    group_size: int = 8
    """G: rollouts per prompt for the group-normalised advantage."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (log-probs for the loss are always at temperature 1)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    max_new_tokens: int = 24
    """Longest response."""
    eps_low: float = 0.2
    """Lower clip of the importance ratio (1 - eps_low)."""
    eps_high: float = 0.28
    """Upper clip of the importance ratio (1 + eps_high; clip-higher when > eps_low)."""
    kl_coef: float = 0.0
    """KL-to-reference coefficient (paper: 0)."""
    filter_zero_variance: bool = False
    """Drop groups whose rewards are all equal (they carry no GRPO signal)."""
    adv_eps: float = 1e-6
    """Added to the group std in the advantage normalisation."""
    default_verifier: str = "math"
    """Verifier for records without a `reward` field (math, choice, exact, numeric, or yours)."""
    reward_workers: int = 2
    """Worker processes for verifiers that need isolation (math-verify); 0 = in-process."""
    reward_timeout_s: float = 5.0
    """Per-item time limit of a verifier; a timeout gives reward 0 and is counted."""
    micro_batch_size: int = 16
    """Sequences per forward/backward micro-batch (when ``max_tokens_per_micro_batch`` is 0)."""
    max_tokens_per_micro_batch: int = 0
    """> 0: training micro-batches by a token budget instead: samples sorted by length, each
    micro-batch as many rows as fit ``rows x its longest row <= budget`` (a longer sample gets
    one of its own), shapes varying between micro-batches; the gradient is the same."""
    rollout_batch_size: int = 64
    """Sequences generated together (KV-cache batch)."""


@dataclass
class OPDConfig:
    prompts_per_step: int = 8
    """Peer prompts per phase-II step and edge (each sampled once by the student)."""
    samples_per_prompt: int = 1
    """Student rollouts per peer prompt."""
    share_clip: bool = True
    """OPD tokens use the same clipped surrogate as GRPO tokens."""
    topk: int = 10
    """k of the top-k token overlap."""
    orm_alpha: float = 0.0
    """MOPD: weight of the outcome-reward advantage added to the distillation advantage."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate (paper: 1e-6 constant)."""
    min_lr: float = 0.0
    """Final learning rate of the cosine / linear schedules."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate decay over the run's steps."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Gradient-norm clip (the norm is reduced over the branch's ranks only)."""


@dataclass
class ToyWorldConfig:
    """Difficulty knobs of the generated toy world (each distinct setting is its own cached world)."""

    text_min_steps: int = 1
    """Text domain: fewest operations per arithmetic problem."""
    text_max_steps: int = 1
    """Text domain: most operations per arithmetic problem."""
    text_max_operand: int = 9
    """Text domain: largest operand (2..99); 9 keeps every operand a single digit."""
    text_word_frac: float = 0.3
    """Text domain: fraction of problems phrased as word problems."""
    image_tasks: list[str] = field(default_factory=lambda: ["colour"])
    """Image question types (colour, kind, count, count_colour, count_kind, majority, biggest)."""
    video_tasks: list[str] = field(default_factory=lambda: ["colour"])
    """Video question types (colour, direction, flashes, mover)."""
    phrasings: int = 6
    """Train/eval questions come in this many forms (1..6: "{q}", "Question: {q}", ...); the
    base is taught only the first, so RL has forms to learn."""
    warmup_size: int | None = None
    """Items per domain of a separate split the base warms up on, in the canonical form only;
    null = data.train_size; 0 = the base warms up on the train split itself (RL then samples
    prompts the base has memorised)."""


@dataclass
class DataConfig:
    world: Literal["toy", "files"] = "toy"
    """toy = the embedded CPU toy world (generated, cached); files = branches' data paths."""
    tokenizer: str | None = None
    """Tokenizer directory (megatron.core.tokenizers metadata); null = the toy tokenizer."""
    cache_dir: str | None = None
    """Where the toy world, tokenizer and base model are cached (default ~/.cache/megatron-copd)."""
    eval_size: int = 500
    """Held-out items per domain in the toy world."""
    train_size: int = 4000
    """Toy world: training items per domain."""
    max_prompt_tokens: int = 160
    """Longest prompt (image placeholders included); longer ones are refused."""
    base_seed: int = 0
    """Seed of the toy base model (independent of the run seed: every run starts from one base)."""
    base_warmup_steps: int = 1200
    """Supervised warm-up steps that turn a random model into the toy base."""
    base_warmup_batch: int = 32
    """Toy base warm-up: sequences per step (split over all ranks)."""
    base_warmup_lr: float = 1e-3
    """Toy base warm-up: peak learning rate (cosine decay)."""
    toy: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    """The toy world's difficulty knobs (data.world: toy)."""


@dataclass
class CheckpointConfig:
    load: str | None = None
    """Base model checkpoint (torch_dist) every branch starts from; null = toy base."""
    interval: int = 0
    """Save every N steps per branch (0: only at the end / on preemption)."""
    keep_last: int = 2
    """Keep the last N checkpoints of each branch (<= 0 keeps all)."""
    keep_every: int = 0
    """Also keep every M-th iteration (0: none)."""
    async_save: bool = False
    """Write checkpoints in the background (published when all ranks finished)."""
    grace_seconds: float = 120.0
    """After SIGTERM/SIGUSR1: finish the step, save, exit; budget for that."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard scalars under run_dir/tb."""
    log_interval: int = 1
    """Steps between console lines."""
    progress: bool = True
    """Print one progress line per step (with ETA) on rank 0."""


@dataclass
class EvalConfig:
    max_items: int = 500
    """Held-out items per domain evaluated (greedy decoding)."""
    at_end: bool = True
    """Evaluate base (at start), every branch and the merged model (at the end)."""
    batch_size: int = 125
    """Sequences decoded together during evaluation."""


@dataclass
class RunConfig:
    run_dir: str = "runs/copd"
    """Run directory: config.yaml, metrics.jsonl, tb/, checkpoints/, merged/, results.json."""
    seed: int = 1234
    """Run seed: rollout sampling, prompt order, RNG states (the toy base uses data.base_seed)."""
    world_size: int | None = None
    """Processes to start when run plainly; default branches x TP x PP x CP x (DP or 1)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    branches: list[BranchConfig] = field(default_factory=list)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def branch_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.branches)

    def branch(self, name: str) -> BranchConfig:
        for b in self.branches:
            if b.name == name:
                return b
        raise ConfigError(f"unknown branch {name!r}; branches are {list(self.branch_names)}")


# ---------------------------------------------------------------------------------------------
# Validation: everything that can be known before launching.


def validate(
    cfg: RunConfig, world_size: int | None = None, check_device: bool = True
) -> RunConfig:
    """Check cross-field constraints; fill derived defaults (branch domains, DP, world size).

    ``check_device=False`` skips the checks of this machine's GPU/TE (``copd check`` on a login
    node validates a GPU job's config)."""
    check_fields(cfg)  # every field inside its domain (config_checks.CONSTRAINTS)
    m = cfg.model
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            f"model.num_query_groups: {m.num_query_groups} must divide "
            f"model.num_attention_heads ({m.num_attention_heads})"
        )
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.num_attention_heads: {m.num_attention_heads} must divide "
            f"model.hidden_size ({m.hidden_size}) or set model.kv_channels"
        )
    p = cfg.parallel
    if m.num_attention_heads % p.tp:
        raise ConfigError(
            f"parallel.tp: {p.tp} must divide model.num_attention_heads ({m.num_attention_heads})"
        )
    if m.num_query_groups % p.tp:
        raise ConfigError(
            f"parallel.tp: {p.tp} must divide model.num_query_groups ({m.num_query_groups})"
        )
    if m.ffn_hidden_size % p.tp:
        raise ConfigError(
            f"parallel.tp: {p.tp} must divide model.ffn_hidden_size ({m.ffn_hidden_size})"
        )
    if m.num_layers % p.pp:
        raise ConfigError(f"parallel.pp: {p.pp} must divide model.num_layers ({m.num_layers})")
    if m.vision is not None:
        v = m.vision
        if v.image_size % v.patch_size:
            raise ConfigError(
                f"model.vision.patch_size: {v.patch_size} must divide "
                f"model.vision.image_size ({v.image_size})"
            )
        if v.num_attention_heads % p.tp or v.hidden_size % v.num_attention_heads:
            raise ConfigError(
                f"model.vision.num_attention_heads: {v.num_attention_heads} must divide "
                f"model.vision.hidden_size ({v.hidden_size}) and be divisible by parallel.tp"
            )
    if m.qwen_vl is not None:
        validate_qwen_vl(m, p)
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel: needs parallel.tp > 1")
    if p.cp > 1:
        # Sequences carry explicit [B, 1, T, T] masks (left padding), which Transformer Engine's
        # context-parallel attention cannot take; rollout and scoring refuse CP as well.
        raise ConfigError("parallel.cp: context parallelism is not supported yet; use 1")
    _validate_precision(cfg, check_device)

    if not cfg.branches:
        raise ConfigError("branches: at least one branch is required")
    names = [b.name for b in cfg.branches]
    if len(set(names)) != len(names):
        raise ConfigError(f"branches: names must be unique, got {names}")
    for i, b in enumerate(cfg.branches):
        if not b.domains:  # the default: the branch's own name, which must then be a domain
            b.domains = [b.name]
            check_field(cfg, "branches[].domains", b.domains, f"branches.{i}.domains")
    _validate_data(cfg)

    _validate_edges(cfg.schedule, tuple(names))

    s = cfg.schedule
    if s.adaptive and not 0 <= s.overlap_floor < s.overlap_ceiling <= 1:
        raise ConfigError(
            "schedule.overlap_floor/overlap_ceiling: expected 0 <= floor < ceiling <= 1"
        )

    per_dp = len(cfg.branches) * p.tp * p.pp * p.cp
    world = world_size or cfg.world_size
    if world is None:
        world = per_dp * (p.dp or 1)
    if world % per_dp:
        raise ConfigError(
            f"world_size: {world} is not divisible by branches x TP x PP x CP = "
            f"{len(cfg.branches)} x {p.tp} x {p.pp} x {p.cp} = {per_dp}"
        )
    if p.dp is not None and p.dp != world // per_dp:
        raise ConfigError(
            f"parallel.dp: {p.dp} does not match world size {world} / (branches x TP x PP x CP "
            f"= {per_dp}) = {world // per_dp}"
        )
    p.dp = world // per_dp
    cfg.world_size = world
    return cfg


def _validate_data(cfg: RunConfig) -> None:
    """The data settings the chosen world reads are there, and the ones it ignores are not."""
    d = cfg.data
    if d.world == "files":
        if not d.tokenizer:
            raise ConfigError("data.tokenizer: required when data.world is 'files'")
        for i, b in enumerate(cfg.branches):
            if not b.train_data:
                raise ConfigError(f"branches.{i}.train_data: data.world is 'files' but no "
                                  "file is listed")
        if d.toy != ToyWorldConfig():
            raise ConfigError("data.toy: used only with data.world 'toy'; remove it")
        return
    for i, b in enumerate(cfg.branches):
        for key in ("train_data", "eval_data"):
            if getattr(b, key):
                raise ConfigError(f"branches.{i}.{key}: used only with data.world 'files' (the "
                                  "toy world generates its data); set data.world: files")
    if d.tokenizer:
        raise ConfigError("data.tokenizer: used only with data.world 'files' (the toy world "
                          "builds its own tokenizer); remove it")
    if d.toy.text_min_steps > d.toy.text_max_steps:
        raise ConfigError(f"data.toy.text_min_steps: {d.toy.text_min_steps} exceeds "
                          f"data.toy.text_max_steps ({d.toy.text_max_steps})")


def _validate_edges(s: ScheduleConfig, names: tuple[str, ...]) -> None:
    """Distillation edges exist, name branches, and are never given where nothing uses them."""
    from megatron_copd.training.topology import build_edges

    if s.recipe in ("copd", "static_opd", "mopd") and len(names) > 1:
        build_edges(s, names)
        return
    for key in ("edges", "drop_edges", "hub"):
        if getattr(s, key):
            raise ConfigError(f"schedule.{key}: recipe {s.recipe!r} with {len(names)} "
                              f"branch(es) has no distillation edges; remove schedule.{key}")


def validate_qwen_vl(m: ModelConfig, p: ParallelConfig) -> None:
    q = m.qwen_vl
    check_fields(q, "model.qwen_vl.")  # also for configs read from HF (not through validate)
    if m.vision is not None:
        raise ConfigError("model.qwen_vl: set either model.vision (CLIP-style) or model.qwen_vl, "
                          "not both")
    if q.version == "qwen3_vl" and (m.family != "qwen3" or not m.use_qk_norm):
        raise ConfigError("model.qwen_vl: the Qwen3-VL decoder has QK-norm; needs family qwen3 "
                          "and qk_layernorm unset or true")
    if q.version == "qwen2_5_vl":
        _validate_qwen2_5_vl(m, q)
    if len(q.mrope_section) != 3 or 2 * sum(q.mrope_section) != m.head_dim:
        raise ConfigError(f"model.qwen_vl.mrope_section: {q.mrope_section} must be 3 numbers "
                          f"summing to head_dim / 2 = {m.head_dim // 2}")
    if q.hidden_size % q.num_heads or (q.hidden_size // q.num_heads) % 4:
        raise ConfigError(f"model.qwen_vl.num_heads: {q.num_heads} must divide hidden_size "
                          f"({q.hidden_size}) into heads of a multiple of 4 (2-D RoPE)")
    if q.num_heads % p.tp:
        raise ConfigError(f"parallel.tp: {p.tp} must divide model.qwen_vl.num_heads "
                          f"({q.num_heads})")
    if round(q.num_position_embeddings ** 0.5) ** 2 != q.num_position_embeddings:
        raise ConfigError(f"model.qwen_vl.num_position_embeddings: {q.num_position_embeddings} "
                          "must be a square number")
    bad = [i for i in q.deepstack_visual_indexes if not 0 <= i < q.depth]
    if bad:
        raise ConfigError(f"model.qwen_vl.deepstack_visual_indexes: {bad} lie outside the "
                          f"{q.depth} vision layers")
    if len(q.deepstack_visual_indexes) > m.num_layers // p.pp:
        raise ConfigError(f"parallel.pp: {p.pp} stages leave {m.num_layers // p.pp} decoder "
                          f"layers on the first stage, but DeepStack adds vision features to "
                          f"the first {len(q.deepstack_visual_indexes)}; use a smaller pp")
    if q.min_pixels > q.max_pixels:
        raise ConfigError(f"model.qwen_vl.min_pixels: {q.min_pixels} exceeds max_pixels "
                          f"({q.max_pixels})")
    if q.video_min_pixels > q.video_max_pixels:
        raise ConfigError(f"model.qwen_vl.video_min_pixels: {q.video_min_pixels} exceeds "
                          f"video_max_pixels ({q.video_max_pixels})")


def _validate_qwen2_5_vl(m: ModelConfig, q: QwenVLConfig) -> None:
    if m.family != "qwen2" or m.use_qk_norm:
        raise ConfigError("model.qwen_vl.version: qwen2_5_vl's decoder is Qwen2 (Q/K/V bias, no "
                          "QK-norm); needs model.family qwen2 and qk_layernorm unset or false")
    for key, ok in (("deepstack_visual_indexes", not q.deepstack_visual_indexes),
                    ("mrope_interleaved", not q.mrope_interleaved)):
        if not ok:
            raise ConfigError(f"model.qwen_vl.{key}: Qwen3-VL only; qwen2_5_vl has "
                              f"{'no DeepStack' if key[0] == 'd' else 'block MRoPE (false)'}")
    bad = [i for i in q.fullatt_block_indexes if not 0 <= i < q.depth]
    if bad:
        raise ConfigError(f"model.qwen_vl.fullatt_block_indexes: {bad} lie outside the "
                          f"{q.depth} vision layers")
    unit = q.patch_size * q.spatial_merge_size
    if q.window_size % unit:
        raise ConfigError(f"model.qwen_vl.window_size: {q.window_size} must be a multiple of "
                          f"patch_size x spatial_merge_size = {unit}")


def _validate_precision(cfg: RunConfig, check_device: bool) -> None:
    pr, m = cfg.precision, cfg.model
    if pr.fp8 is None:
        for name in ("fp8_format", "fp8_bf16_edge_layers"):
            if getattr(pr, name) is not None:
                raise ConfigError(f"precision.{name}: only applies with precision.fp8 set")
        if pr.fp8_rollout:
            raise ConfigError("precision.fp8_rollout: needs a precision.fp8 recipe")
        return
    if pr.transformer_impl == "local":
        raise ConfigError("precision.fp8: FP8 needs Transformer Engine layers, not "
                          "precision.transformer_impl='local'")
    if pr.dtype == "fp32":
        raise ConfigError("precision.dtype: FP8 training needs bf16 (or fp16) weights, not fp32")
    if pr.fp8 == "mxfp8" and pr.fp8_format == "hybrid":
        raise ConfigError("precision.fp8_format: mxfp8 uses e4m3")
    edge = pr.fp8_bf16_edge_layers
    if edge is not None:
        if pr.fp8 == "delayed" and edge > 0:
            raise ConfigError("precision.fp8_bf16_edge_layers: delayed scaling cannot keep "
                              "layers in BF16; use 0 or another recipe")
        per_stage = m.num_layers // cfg.parallel.pp
        if not 0 <= edge <= per_stage // 2:
            raise ConfigError(f"precision.fp8_bf16_edge_layers: expected 0..{per_stage // 2} "
                              f"(half the {per_stage} layers per pipeline stage), got {edge}")
    if check_device:
        from megatron_copd.models.precision import check_fp8_here

        check_fp8_here(pr.fp8)


def default_config_path() -> Path:
    """The embedded default: 2-branch (text + image) CoPD on the CPU toy world."""
    return Path(__file__).parent / "configs" / "toy_copd.yaml"


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    world_size: int | None = None,
    check_device: bool = True,
) -> RunConfig:
    """YAML file (default: the embedded toy CoPD config) + overrides -> validated RunConfig."""
    data = _load_with_bases(Path(path) if path else default_config_path())
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value, RunConfig)
    cfg = from_dict(RunConfig, data)
    return validate(cfg, world_size=world_size, check_device=check_device)


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML file whose top-level ``base: other.yaml`` (relative to the file) is loaded first and
    overridden key by key (mappings merge recursively; lists and scalars replace)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to this file")
    data = load_yaml(path)
    parent = data.pop("base", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: base: expected a path to a YAML file, got {parent!r}")
    return _deep_merge(_load_with_bases(path.parent / parent, (*seen, path)), data)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)
