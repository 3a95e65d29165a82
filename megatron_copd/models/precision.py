"""Mixed precision and FP8: config -> TransformerConfig fields, hardware checks, and the switch
that runs rollout / teacher-scoring forwards in BF16 while training GEMMs run in FP8.

Training: BF16 weights and activations, fp32 master weights and fp32 gradient reduction
(megatron's optimizer and DDP, ``training.branch_model``); with ``precision.fp8`` the GEMMs of
every Transformer Engine linear layer run in FP8 under megatron's per-block ``fp8_autocast``
(``fp8_utils.get_fp8_context``). The vision tower, projector and LM head stay BF16.

Rollout and scoring (``rollout.generation``, ``rollout.scoring``) wrap their forwards in
:func:`inference_precision`: by default that switches FP8 off for the duration (megatron builds
the autocast from ``config.fp8`` inside every block, so an outer ``fp8_autocast(enabled=False)``
would be overridden; clearing ``config.fp8`` is the switch megatron itself reads). With
``precision.fp8_rollout`` the forwards stay in FP8 and TE linear inputs are padded to the FP8
GEMM row alignment (a decode step has only ``batch`` rows).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from collections.abc import Iterator

import torch

from megatron_copd.config_base import ConfigError

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Precision names used in configs and tool flags -> torch dtypes."""

# Recipe -> (TE version that has it in megatron 0.19, default FP8 format). Formats follow the
# NVIDIA recipes (Megatron-Bridge mixed_precision): HYBRID = E4M3 forward, E5M2 gradients.
FP8_RECIPES: dict[str, tuple[str, str]] = {
    "delayed": ("2.1.0", "hybrid"),
    "tensorwise": ("2.2.0", "hybrid"),
    "blockwise": ("2.3.0", "hybrid"),
    "mxfp8": ("2.1.0", "e4m3"),
}


def fp8_transformer_kwargs(precision, num_layers: int, pp: int = 1) -> dict:
    """TransformerConfig fields for ``precision.fp8`` ({} when FP8 is off)."""
    recipe = precision.fp8
    if recipe is None:
        return {}
    kw: dict = {"fp8": precision.fp8_format or FP8_RECIPES[recipe][1], "fp8_recipe": recipe}
    if recipe == "delayed":
        # NVIDIA's delayed-scaling defaults: scale from the max over a long amax history.
        kw.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max", fp8_margin=0)
    edge = bf16_edge_layers(precision)
    if edge:
        per_stage = num_layers // pp
        edge = min(edge, per_stage)
        kw.update(
            first_last_layers_bf16=True,
            num_layers_at_start_in_bf16=edge,
            num_layers_at_end_in_bf16=edge,
        )
    return kw


def bf16_edge_layers(precision) -> int:
    """First/last N decoder layers kept in BF16: default 1 with current scaling (the NVIDIA
    recipe), 0 otherwise; delayed scaling cannot do it (megatron refuses)."""
    if precision.fp8 is None:
        return 0
    if precision.fp8_bf16_edge_layers is not None:
        return precision.fp8_bf16_edge_layers
    return 1 if precision.fp8 == "tensorwise" else 0


def fp8_align_size(recipe: str | None) -> int:
    """Row alignment of FP8 GEMM inputs (megatron's get_fp8_align_size); 1 without FP8."""
    if recipe is None:
        return 1
    return 32 if recipe == "mxfp8" else 16


def sequence_multiple(cfg) -> int:
    """Training micro-batch widths must be a multiple of this: TP under sequence parallelism
    (the sequence is split over TP ranks) times the FP8 row alignment (each rank's GEMMs see
    batch x width / TP rows)."""
    sp = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
    return sp * fp8_align_size(cfg.precision.fp8)


def inference_width_multiple(model, tp_size: int) -> int:
    """The same for a no-grad forward of ``model`` under :func:`inference_precision`: FP8
    alignment only when the model runs inference in FP8 (``precision.fp8_rollout``)."""
    inner = _unwrap(model)
    config = inner.config
    sp = tp_size if config.sequence_parallel else 1
    fp8 = getattr(inner, "fp8_inference", False) and config.fp8
    return sp * (fp8_align_size(config.fp8_recipe) if fp8 else 1)


# ---------------------------------------------------------------------------------------------
# Hardware / software support


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def fp8_support_problem(
    recipe: str,
    capability: tuple[int, int] | None,
    cuda_version: str | None,
    te_version: str | None,
) -> str | None:
    """Why ``recipe`` cannot run here (one line), or None. Pure: the facts are arguments.

    Rules (Transformer Engine 2.x): FP8 GEMMs need compute capability >= 8.9 (Ada/Hopper);
    block scaling needs >= 9.0 and CUDA >= 12.9; MXFP8 needs Blackwell (10.x)."""
    if capability is None:
        return "FP8 needs a CUDA GPU (Hopper or newer); none found"
    if te_version is None:
        return (
            "FP8 needs Transformer Engine; install the 'gpu' extra "
            "(pip install 'megatron-copd[gpu]')"
        )
    need_te, _ = FP8_RECIPES[recipe]
    if _version_tuple(te_version) < _version_tuple(need_te):
        return f"recipe {recipe!r} needs Transformer Engine >= {need_te}; found {te_version}"
    sm = f"sm_{capability[0]}{capability[1]}"
    if recipe == "mxfp8":
        if not (10, 0) <= capability < (12, 0):
            return (
                f"recipe 'mxfp8' needs a Blackwell GPU (sm_100); this GPU is {sm}: "
                "use 'tensorwise', 'delayed' or 'blockwise' on Hopper"
            )
        return None
    if capability < (8, 9):
        return f"FP8 needs compute capability 8.9+ (Ada, Hopper, Blackwell); this GPU is {sm}"
    if recipe == "blockwise":
        if capability < (9, 0):
            return f"recipe 'blockwise' needs Hopper (sm_90) or newer; this GPU is {sm}"
        if cuda_version is None or _version_tuple(cuda_version) < (12, 9):
            return f"recipe 'blockwise' needs CUDA >= 12.9; torch was built with {cuda_version}"
    return None


def te_version() -> str | None:
    """Installed Transformer Engine version, None when it is not installed."""
    if importlib.util.find_spec("transformer_engine") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    for dist_name in ("transformer-engine", "transformer_engine", "transformer-engine-cu12"):
        try:
            return version(dist_name)
        except PackageNotFoundError:
            pass
    return "0"  # importable but of unknown version: recipe version checks will refuse


def check_fp8_here(recipe: str) -> None:
    """Raise ConfigError when ``recipe`` cannot run on this machine."""
    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    problem = fp8_support_problem(recipe, cap, torch.version.cuda, te_version())
    if problem:
        raise ConfigError(f"precision.fp8: {problem}")


# ---------------------------------------------------------------------------------------------
# Inference forwards: BF16 (default) or FP8 with row padding


def _unwrap(model):
    from megatron.core.utils import unwrap_model

    return unwrap_model(model)


def _fp8_configs(model) -> list:
    """Distinct TransformerConfig objects of ``model`` with FP8 on."""
    seen: dict[int, object] = {}
    for module in _unwrap(model).modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "fp8", None) and id(config) not in seen:
            seen[id(config)] = config
    return list(seen.values())


@contextlib.contextmanager
def fp8_disabled(model) -> Iterator[None]:
    """Forwards inside run without FP8 (BF16 GEMMs); every config is restored on exit."""
    configs = _fp8_configs(model)
    saved = [(c, c.fp8) for c in configs]
    for c in configs:
        c.fp8 = None
    try:
        yield
    finally:
        for c, value in saved:
            c.fp8 = value


def _pad_rows_forward(module, align: int):
    """Wrap a TE linear's forward: flatten the leading dims, pad rows with zeros to ``align``,
    run, drop the padded rows (zero rows stay zero through norms and bias-free GEMMs and are
    cut before anything reads them)."""
    forward = module.forward

    def padded(inp, *args, **kwargs):
        rows = math.prod(inp.shape[:-1])
        pad = (-rows) % align
        if pad == 0 or getattr(module, "sequence_parallel", False):
            # Under sequence parallelism TE gathers rows over TP itself: the caller pads the
            # width instead (inference_width_multiple).
            return forward(inp, *args, **kwargs)
        flat = inp.reshape(rows, 1, inp.shape[-1])
        flat = torch.cat([flat, flat.new_zeros(pad, 1, inp.shape[-1])], dim=0)
        out = forward(flat, *args, **kwargs)
        first, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        first = first[:rows].reshape(*inp.shape[:-1], first.shape[-1])
        return (first, *rest) if rest is not None else first

    return padded


@contextlib.contextmanager
def fp8_rows_padded(model, align: int, linear_types: tuple | None = None) -> Iterator[None]:
    """Pad the inputs of every TE linear layer to ``align`` rows while inside (FP8 GEMMs need
    rows % 16 == 0; a decode step has ``batch`` rows). Call with sequence parallelism off."""
    if linear_types is None:
        from megatron.core import fp8_utils

        linear_types = fp8_utils.TE_LINEAR_TYPES
    wrapped = []
    for module in _unwrap(model).modules():
        if linear_types and isinstance(module, linear_types) and "forward" not in vars(module):
            module.forward = _pad_rows_forward(module, align)
            wrapped.append(module)
    try:
        yield
    finally:
        for module in wrapped:
            del module.forward  # the class's forward again


@contextlib.contextmanager
def inference_precision(model) -> Iterator[None]:
    """The precision of rollout and teacher-scoring forwards. Wrap every no-grad forward of
    ``rollout`` in it (``generate.inference_forward`` and ``scoring`` do).

    No FP8 configured: nothing changes. FP8 training with ``precision.fp8_rollout`` false (the
    default): FP8 is off inside, GEMMs run in BF16. With ``fp8_rollout``: FP8 stays on and TE
    linear inputs are row-padded to the FP8 alignment."""
    configs = _fp8_configs(model)
    if not configs:
        yield
        return
    if getattr(_unwrap(model), "fp8_inference", False):
        align = max(fp8_align_size(c.fp8_recipe) for c in configs)
        with fp8_rows_padded(model, align):
            yield
        return
    with fp8_disabled(model):
        yield
