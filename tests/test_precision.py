"""Precision / FP8 / GPU plumbing that can be checked on a CPU: config validation, the FP8
support rules, the TransformerConfig mapping, the BF16 switch for rollout forwards (wired into
generate and scoring), FP8 row padding, the TE mask type, the FP8 amax group, backend choice,
host-staged point-to-point, and loading a checkpoint that lacks TE's extra state."""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist
from harness import run_world
from megatron.core.transformer.enums import AttnMaskType

from megatron_copd.config import ConfigError, RunConfig, validate
from megatron_copd.config_base import from_dict
from megatron_copd.models import precision as prec
from megatron_copd.models.specs import effective_mask_type
from megatron_copd.runtime.distributed import LaunchEnv, choose_backend, ranks_on_node

H100 = (9, 0)


def cfg_of(precision: dict | None = None, parallel: dict | None = None, layers: int = 4):
    return from_dict(RunConfig, {
        "branches": [{"name": "a", "domains": ["text"]}],
        "model": {"hidden_size": 64, "num_layers": layers, "ffn_hidden_size": 128,
                  "num_attention_heads": 4, "num_query_groups": 2},
        "parallel": parallel or {},
        "precision": precision or {},
    })


# ------------------------------------------------------------------ FP8 support rules


@pytest.mark.parametrize(
    "recipe, cap, cuda, te, fragment",
    [
        ("delayed", H100, "12.8", "2.8.0", None),
        ("tensorwise", H100, "12.8", "2.8.0", None),
        ("blockwise", H100, "12.9", "2.8.0", None),
        ("blockwise", H100, "12.8", "2.8.0", "CUDA >= 12.9"),
        ("mxfp8", H100, "12.9", "2.8.0", "Blackwell"),
        ("mxfp8", (10, 0), "12.9", "2.8.0", None),
        ("tensorwise", (8, 0), "12.4", "2.8.0", "8.9+"),
        ("blockwise", (8, 9), "12.9", "2.8.0", "Hopper"),
        ("tensorwise", H100, "12.8", "2.1.0", ">= 2.2.0"),
        ("delayed", None, None, "2.8.0", "CUDA GPU"),
        ("delayed", H100, "12.8", None, "Transformer Engine"),
    ],
)
def test_fp8_support_rules(recipe, cap, cuda, te, fragment):
    problem = prec.fp8_support_problem(recipe, cap, cuda, te)
    if fragment is None:
        assert problem is None
    else:
        assert fragment in problem, problem
        assert "\n" not in problem


def test_mxfp8_on_hopper_names_the_gpu_and_the_alternatives():
    msg = prec.fp8_support_problem("mxfp8", H100, "12.9", "2.8.0")
    assert "sm_90" in msg and "tensorwise" in msg


# ------------------------------------------------------------------ config validation


@pytest.mark.parametrize(
    "precision, parallel, fragment",
    [
        ({"fp8_rollout": True}, {}, "precision.fp8_rollout"),
        ({"fp8_format": "e4m3"}, {}, "precision.fp8_format"),
        ({"fp8": "delayed", "transformer_impl": "local"}, {}, "Transformer Engine"),
        ({"fp8": "tensorwise", "dtype": "fp32"}, {}, "precision.dtype"),
        ({"fp8": "delayed", "fp8_bf16_edge_layers": 1}, {}, "delayed scaling"),
        ({"fp8": "tensorwise", "fp8_bf16_edge_layers": 3}, {}, "expected 0..2"),
        ({"fp8": "mxfp8", "fp8_format": "hybrid"}, {}, "e4m3"),
        ({}, {"cp": 2}, "parallel.cp"),
        ({}, {"sequence_parallel": True}, "tp > 1"),
    ],
)
def test_precision_config_errors(precision, parallel, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("+", r"\+")):
        validate(cfg_of(precision, parallel), check_device=False)


def test_fp8_config_is_checked_against_this_machine_only_when_asked():
    cfg = validate(cfg_of({"fp8": "tensorwise", "fp8_rollout": True}), check_device=False)
    assert cfg.precision.fp8 == "tensorwise"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="precision.fp8: FP8 needs a CUDA GPU"):
            validate(cfg_of({"fp8": "tensorwise"}))


# ------------------------------------------------------------------ TransformerConfig mapping


def test_fp8_recipes_map_onto_megatron_fields():
    from megatron_copd.models.factory import lm_transformer_config, vision_transformer_config

    delayed = lm_transformer_config(cfg_of({"dtype": "bf16", "fp8": "delayed"}), te=True)
    assert (delayed.fp8, delayed.fp8_recipe) == ("hybrid", "delayed")
    assert delayed.fp8_amax_history_len == 1024 and delayed.fp8_amax_compute_algo == "max"
    assert not delayed.first_last_layers_bf16

    current = lm_transformer_config(cfg_of({"dtype": "bf16", "fp8": "tensorwise"}), te=True)
    assert (current.fp8, current.fp8_recipe) == ("hybrid", "tensorwise")
    assert current.first_last_layers_bf16 and current.num_layers_at_start_in_bf16 == 1
    assert current.masked_softmax_fusion is False  # our explicit masks must be honoured

    mx = lm_transformer_config(cfg_of({"dtype": "bf16", "fp8": "mxfp8"}), te=True)
    assert (mx.fp8, mx.fp8_recipe) == ("e4m3", "mxfp8")
    block = lm_transformer_config(
        cfg_of({"dtype": "bf16", "fp8": "blockwise", "fp8_format": "e4m3",
                "fp8_bf16_edge_layers": 2}), te=True)
    assert block.fp8 == "e4m3" and block.num_layers_at_end_in_bf16 == 2

    vcfg = cfg_of({"dtype": "bf16", "fp8": "tensorwise"})
    vcfg.model.vision = from_dict(RunConfig, {"model": {"vision": {}}}).model.vision
    assert vision_transformer_config(vcfg, te=True).fp8 is None  # the ViT stays BF16
    with pytest.raises(ValueError, match="Transformer Engine"):
        lm_transformer_config(cfg_of({"fp8": "delayed"}), te=False)


def test_sequence_multiple():
    assert prec.sequence_multiple(cfg_of()) == 1
    assert prec.sequence_multiple(cfg_of(parallel={"tp": 2, "sequence_parallel": True})) == 2
    assert prec.sequence_multiple(cfg_of({"fp8": "tensorwise"})) == 16
    assert prec.sequence_multiple(cfg_of({"fp8": "mxfp8"})) == 32
    both = cfg_of({"fp8": "delayed"}, {"tp": 2, "sequence_parallel": True})
    assert prec.sequence_multiple(both) == 32  # each rank's rows: T / TP must align to 16


def test_te_attention_runs_the_arbitrary_mask_whenever_a_mask_is_given():
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    assert effective_mask_type(mask, AttnMaskType.causal) is AttnMaskType.arbitrary
    # megatron switches decode steps to no_mask; our key-padding mask must still apply
    assert effective_mask_type(mask[:, :, -1:], AttnMaskType.no_mask) is AttnMaskType.arbitrary
    assert effective_mask_type(None, AttnMaskType.causal) is AttnMaskType.causal


# ------------------------------------------------------------------ inference precision


class _FakeLinear(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.weight = torch.nn.Parameter(torch.randn(3, 5))
        self.rows_seen: list[int] = []

    def forward(self, x):
        self.rows_seen.append(x.reshape(-1, x.shape[-1]).shape[0])
        return x @ self.weight.t(), None


def _fake_model(recipe="tensorwise"):
    config = types.SimpleNamespace(fp8="hybrid", fp8_recipe=recipe, sequence_parallel=False)
    model = torch.nn.Sequential(_FakeLinear(config), _FakeLinear(config))
    model.config = config
    return model, config


def test_fp8_disabled_clears_and_restores_every_config():
    model, config = _fake_model()
    other = types.SimpleNamespace(fp8="e4m3")
    model[1].config = other
    with prec.fp8_disabled(model):
        assert config.fp8 is None and other.fp8 is None
    assert config.fp8 == "hybrid" and other.fp8 == "e4m3"
    with pytest.raises(RuntimeError), prec.inference_precision(model):
        assert config.fp8 is None
        raise RuntimeError("restored even on errors")
    assert config.fp8 == "hybrid"


def test_fp8_rollout_keeps_fp8_and_pads_linear_rows():
    model, config = _fake_model()
    x = torch.randn(1, 3, 5)  # a decode step: 3 rows
    with prec.fp8_rows_padded(model, 16, linear_types=(_FakeLinear,)):
        out, _ = model[0](x)
        assert config.fp8 == "hybrid"
    assert model[0].rows_seen == [16]
    assert out.shape == (1, 3, 3)
    torch.testing.assert_close(out, x @ model[0].weight.t())
    assert "forward" not in vars(model[0])  # unwrapped on exit
    model[0](torch.randn(3, 5))
    assert model[0].rows_seen[-1] == 3
    # aligned inputs are passed through untouched
    with prec.fp8_rows_padded(model, 16, linear_types=(_FakeLinear,)):
        model[1](torch.randn(2, 8, 5))
    assert model[1].rows_seen == [16]


def test_inference_precision_follows_the_models_fp8_inference_flag():
    model, config = _fake_model()
    model.fp8_inference = True
    with prec.inference_precision(model):
        assert config.fp8 == "hybrid"
    model.fp8_inference = False
    with prec.inference_precision(model):
        assert config.fp8 is None
    plain = torch.nn.Linear(2, 2)  # no FP8 anywhere: nothing to do
    with prec.inference_precision(plain):
        pass


# ------------------------------------------------------------------ backend choice


@pytest.mark.parametrize(
    "devices, ranks, override, expected",
    [(0, 2, None, "gloo"), (8, 8, None, "nccl"), (1, 2, None, "gloo"), (4, None, None, "nccl"),
     (1, 2, "nccl", "nccl"), (8, 8, "gloo", "gloo")],
)
def test_choose_backend(devices, ranks, override, expected):
    assert choose_backend(devices, ranks, override) == expected


def test_choose_backend_refuses_nonsense():
    from megatron_copd.errors import UserError

    with pytest.raises(UserError, match="COPD_DIST_BACKEND"):
        choose_backend(1, 1, "mpi")
    with pytest.raises(UserError, match="no CUDA device"):
        choose_backend(0, 1, "nccl")


def test_ranks_on_node(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    env = LaunchEnv(0, 4, 0, "127.0.0.1", 1, "torchrun")
    assert ranks_on_node(env) is None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert ranks_on_node(env) == 4
    # SLURM may bind one GPU per task: never conclude that ranks share devices
    assert ranks_on_node(LaunchEnv(0, 8, 0, "h", 1, "slurm")) is None
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert ranks_on_node(LaunchEnv(0, 2, 0, "h", 1, "local")) == 2


# ------------------------------------------------------------------ FP8 amax group


def test_fp8_amax_group_is_the_branch_tp_dp_group(monkeypatch):
    from megatron.core import fp4_utils, fp8_utils, parallel_state
    from megatron.core.extensions import transformer_engine as te_ext

    from megatron_copd.runtime import fp8_groups

    for mod, name in ((fp8_utils, "parallel_state"), (fp4_utils, "parallel_state"),
                      (te_ext, "model_parallel_is_initialized"),
                      (te_ext, "get_amax_reduction_group")):
        monkeypatch.setattr(mod, name, getattr(mod, name, None), raising=False)
    pgs = types.SimpleNamespace(tp="TP", tp_cp="TPCP", tp_dp_cp="TPDPCP")
    fp8_groups.install(pgs)
    view = fp8_utils.parallel_state
    assert view.model_parallel_is_initialized()
    assert view.get_amax_reduction_group(with_context_parallel=True) == "TPDPCP"
    assert view.get_amax_reduction_group(with_context_parallel=True, tp_only_amax_red=True) \
        == "TPCP"
    assert view.get_amax_reduction_group(tp_only_amax_red=True) == "TP"
    assert view.get_tensor_model_parallel_group is parallel_state.get_tensor_model_parallel_group
    assert fp4_utils.parallel_state is view
    assert te_ext.get_amax_reduction_group(with_context_parallel=True) == "TPDPCP"
    assert not parallel_state.model_parallel_is_initialized()  # the real module is untouched


# ------------------------------------------------------------------ multi-process


def _staged_p2p(rank, world_size):
    from megatron_copd.runtime.distributed import batch_p2p, needs_host_staging

    peer = 1 - rank
    mine = torch.arange(6, dtype=torch.float32) + 10 * rank
    inbox = torch.zeros(6)
    assert not needs_host_staging(dist.group.WORLD, mine)  # CPU tensors never need it
    for stage in (True, None):
        inbox.zero_()
        batch_p2p([dist.P2POp(dist.isend, mine, peer), dist.P2POp(dist.irecv, inbox, peer)],
                  stage=stage)
        assert torch.equal(inbox, torch.arange(6, dtype=torch.float32) + 10 * peer)
    batch_p2p([])
    return True


def test_batch_p2p_with_host_staging():
    assert run_world(_staged_p2p, 2) == [True, True]


def _rollout_forwards_run_without_fp8(rank, world_size, ckpt_dir):
    """generate / score_responses switch FP8 off inside and restore it; training-mode forwards
    keep it. (Without TE, megatron's FP8 context is a no-op, so the flag can be set on CPU.)"""
    from megatron_copd.checkpoint.model_io import load_model, save_model
    from megatron_copd.errors import CheckpointError
    from megatron_copd.models.factory import build_model
    from megatron_copd.rollout.generation import generate
    from megatron_copd.rollout.sampling import SamplingParams
    from megatron_copd.rollout.scoring import score_responses
    from megatron_copd.runtime.branches import BranchLayout, build_branch_groups
    from megatron_copd.runtime.megatron_state import init_megatron_state

    cfg = validate(cfg_of({"dtype": "fp32"}, layers=2), world_size=1)
    groups = build_branch_groups(BranchLayout(("a",)))
    init_megatron_state(groups, 3)
    model = build_model(cfg, groups.pgs)
    assert model.fp8_inference is False
    seen = []
    layer = model.language_model.decoder.layers[0]
    layer.register_forward_pre_hook(lambda m, a: seen.append(m.config.fp8))
    model.config.fp8 = "hybrid"
    prompts = [[7, 8, 9], [10, 11]]
    ro = generate(model, groups.pgs, prompts, SamplingParams(max_new_tokens=3, seed=1))
    score_responses(model, groups.pgs, prompts, ro.responses())
    assert seen and all(v is None for v in seen), seen
    assert model.config.fp8 == "hybrid"
    seen.clear()
    model.train()
    model(torch.tensor([[7, 8]]), torch.tensor([[0, 1]]), None)
    assert seen == ["hybrid"]
    model.config.fp8 = None

    # A checkpoint without TE's `_extra_state` (written with local layers) loads into a model
    # whose layers have it; a real weight missing from the checkpoint is an error.
    save_model(model, groups.pgs, ckpt_dir, {"kind": "test"})

    class ExtraState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.state = {"amax": 1.5}

        def get_extra_state(self):
            return self.state

        def set_extra_state(self, state):
            self.state = state

    fresh = build_model(cfg, groups.pgs)
    fresh.probe = ExtraState()
    load_model(fresh, groups.pgs, ckpt_dir)
    assert fresh.probe.state == {"amax": 1.5}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    fresh.extra_weight = torch.nn.Linear(2, 2, bias=False)
    try:
        load_model(fresh, groups.pgs, ckpt_dir)
    except CheckpointError as e:
        assert "extra_weight" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("a missing weight was accepted")
    return True


def test_rollout_precision_switch_and_te_tolerant_checkpoint_load(tmp_path):
    assert run_world(_rollout_forwards_run_without_fp8, 1, (str(tmp_path / "ckpt"),)) == [True]
