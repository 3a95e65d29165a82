"""Give megatron's FP8 code the branch's amax-reduction group.

megatron 0.19 takes the FP8 amax-reduction group from its global ``parallel_state`` (in
``fp8_utils.get_fp8_context`` and TE's per-layer quantization contexts), and passes ``None`` when
parallel_state is not initialised, which is always the case in this project. Transformer
Engine then reduces the delayed-scaling amaxes over the *default* group, i.e. the whole world:
a collective that crosses branches after every training forward and backward (branches run
different numbers of micro-batches, so it hangs or mixes their scales).

The fix is process-wide and small: those two call sites see a view of ``parallel_state`` that
answers the amax-group questions from this rank's branch groups (TP x DP x CP, as megatron's
own CUDA-graph path does from ``pg_collection``) and delegates everything else to the real
module. Nothing else in megatron is affected. Call :func:`install` once per process after the
branch groups exist (``runtime.megatron_state.init_megatron_state`` does).
"""

from __future__ import annotations

from types import ModuleType

from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection


class AmaxGroupView:
    """``parallel_state`` as megatron's FP8 code sees it after :func:`install`."""

    def __init__(self, pgs: ProcessGroupCollection) -> None:
        self._pgs = pgs

    def model_parallel_is_initialized(self) -> bool:
        return True

    def get_amax_reduction_group(
        self, with_context_parallel: bool = False, tp_only_amax_red: bool = False
    ):
        # CP is always 1 here (config validation), so the with/without-CP groups coincide.
        if tp_only_amax_red:
            return self._pgs.tp_cp if with_context_parallel else self._pgs.tp
        return self._pgs.tp_dp_cp

    def __getattr__(self, name: str):
        return getattr(parallel_state, name)


def install(pgs: ProcessGroupCollection) -> AmaxGroupView:
    """Point megatron's FP8/FP4 contexts at this rank's branch groups. Idempotent."""
    from megatron.core import fp4_utils, fp8_utils

    view = AmaxGroupView(pgs)
    for module in (fp8_utils, fp4_utils):
        module.parallel_state = view  # they call parallel_state.<fn>() at forward time
    te_ext = _te_extension()
    if te_ext is not None:
        te_ext.model_parallel_is_initialized = view.model_parallel_is_initialized
        te_ext.get_amax_reduction_group = view.get_amax_reduction_group
    return view


def _te_extension() -> ModuleType | None:
    try:
        from megatron.core.extensions import transformer_engine as te_ext
    except Exception:  # noqa: BLE001 - TE missing or broken: nothing to patch
        return None
    return te_ext
