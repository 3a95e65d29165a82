"""GPTModel with the one piece of megatron's sharded-state-dict code that still reads the global
parallel_state fixed to use the process groups it was built with."""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.utils import make_tp_sharded_tensor_for_checkpoint


class LanguageModel(GPTModel):
    """megatron GPTModel; see ``tie_embeddings_and_output_weights_state_dict``."""

    def tie_embeddings_and_output_weights_state_dict(
        self,
        sharded_state_dict,
        output_layer_weight_key: str,
        first_stage_word_emb_key: str,
        metadata: dict | None = None,
    ) -> None:
        # megatron 0.19 takes the replica id's DP rank from parallel_state here (it asserts when
        # parallel_state is not initialised, which is always the case in this project, with PP > 1
        # and tied embeddings). Same logic, with the DP x CP group from `metadata`.
        if not self.post_process or self.pre_process or getattr(self, "mtp_process", False):
            return super().tie_embeddings_and_output_weights_state_dict(
                sharded_state_dict, output_layer_weight_key, first_stage_word_emb_key, metadata or {}
            )
        dp_cp_group = (metadata or {})["dp_cp_group"]
        del sharded_state_dict[output_layer_weight_key]
        sharded_state_dict[output_layer_weight_key] = make_tp_sharded_tensor_for_checkpoint(
            tensor=self.shared_embedding_or_output_weight(),
            key=first_stage_word_emb_key,
            replica_id=(1, 0, dp_cp_group.rank()),  # a copy of the first stage's embedding
            allow_shape_mismatch=True,
            tp_group=self.tp_group,
            dp_cp_group=dp_cp_group,
        )
