"""One model class for every branch: a Qwen3/Llama-shaped GPTModel, optionally with a CLIP-style
ViT and an MLP projector (HF LLaVA layout).

Images enter the token stream as *expanded* placeholders: an image is ``tokens_per_image``
consecutive ``image_token_id`` tokens, and the projected vision features replace their embeddings
one for one. The sequence length therefore equals the token count, so labels, log-probs, loss
masks and KV-cache positions stay aligned with the token ids (megatron's LLaVAModel instead
expands one ``-200`` token inside the model, which shifts every position after an image).
A video is a sequence of frames, each encoded like an image.

Pipeline parallelism: the vision tower and the splice live on the first stage only; later stages
receive hidden states through megatron's schedule (``set_input_tensor``).
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class CopdModel(MegatronModule):
    """Language model with an optional vision encoder; forward mirrors GPTModel.forward."""

    fp8_inference: bool = False
    """Rollout/scoring forwards in FP8 (precision.fp8_rollout); see models.precision."""

    def __init__(
        self,
        config: TransformerConfig,
        language_model: GPTModel,
        vision_model: CLIPViTModel | None,
        vision_projection: MultimodalProjector | None,
        image_token_id: int | None,
        pg_collection: ProcessGroupCollection,
        tokens_per_image: int | None = None,
    ) -> None:
        super().__init__(config=config)
        self.language_model = language_model
        self.vision_model = vision_model
        self.vision_projection = vision_projection
        self.image_token_id = image_token_id
        # Known on every pipeline stage (the vision tower lives on the first one only), so that
        # input checks agree on all ranks. None for a text-only model.
        self.tokens_per_image = tokens_per_image
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp  # MegatronModule.sharded_state_dict reads it
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        self.share_embeddings_and_output_weights = (
            language_model.share_embeddings_and_output_weights
        )
        # megatron's schedules and DDP look these up on the model chunk.
        self.model_type = language_model.model_type

    @property
    def has_vision(self) -> bool:
        return self.vision_model is not None

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n_images, 3, H, W] -> [n_images, tokens_per_image, lm_hidden]."""
        feats = self.vision_model(pixels)  # [n, t, vision_hidden]
        n, t, h = feats.shape
        out = self.vision_projection(feats.reshape(n * t, h))
        return out.reshape(n, t, -1)

    def embed(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, pixels: torch.Tensor | None
    ) -> torch.Tensor:
        """Token embeddings [s, b, h] with image features spliced in at placeholder positions."""
        lm = self.language_model
        emb = lm.embedding(input_ids=input_ids, position_ids=position_ids)  # [s, b, h]
        if pixels is not None and pixels.numel() > 0:
            if not self.has_vision:
                raise ValueError("images were given to a model built without a vision encoder")
            feats = self.encode_images(pixels.to(emb.dtype))  # [n, t, h]
            mask = (input_ids == self.image_token_id).transpose(0, 1)  # [s, b]
            n_slots = int(mask.sum())
            if n_slots != feats.shape[0] * feats.shape[1]:
                raise ValueError(
                    f"image placeholders ({n_slots} tokens) do not match the images given "
                    f"({feats.shape[0]} x {feats.shape[1]} tokens)"
                )
            # Placeholders are filled in [s, b] order; the collate step orders images the same way
            # (batch-major, then position) by passing the feature order explicitly.
            order = _placeholder_order(input_ids, self.image_token_id)
            flat = feats.reshape(-1, feats.shape[-1])[order]
            emb = emb.clone()
            emb[mask] = flat.to(emb.dtype)
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(
                emb, group=self.pg_collection.tp
            )
        return emb

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
        inference_context=None,
        runtime_gather_output: bool | None = None,
        **kwargs,
    ) -> torch.Tensor:
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(input_ids, position_ids, pixels)
        return self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            inference_context=inference_context,
            runtime_gather_output=runtime_gather_output,
            **kwargs,
        )


def _placeholder_order(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Index that maps batch-major placeholder order onto ``emb[mask]``'s [s, b] order.

    Images are supplied batch-major (all of sample 0's images, then sample 1's ...) while boolean
    indexing of the [s, b] embedding visits positions sequence-major.
    """
    b_major = (input_ids == image_token_id).nonzero()  # rows (b, s), sorted by b then s
    rank_in_b_major = torch.arange(b_major.shape[0], device=input_ids.device)
    # Sort the same positions by (s, b) to get emb[mask]'s visiting order.
    s_major_keys = b_major[:, 1] * input_ids.shape[0] + b_major[:, 0]
    return rank_in_b_major[torch.argsort(s_major_keys)]
