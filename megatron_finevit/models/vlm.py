"""FineViT-VL in megatron: FineViT encoder -> 2×2 merge projector -> Qwen3 ``GPTModel``.

The prompt holds one image placeholder token (``image_token_id``) per 2×2 merge window of each
image, in pack order; their input embeddings are replaced by the projected image features and
the language model runs on the result through ``GPTModel(decoder_input=...)``. This matches
``megatron_finevit.hf.FineViTVLForConditionalGeneration``.

Limitation: built and tested at TP = 1, PP = 1 (the encoder output is used whole and the
language model runs as a single stage); ``FineViTVLConfig.validate`` refuses other layouts.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_finevit.config.vlm import FineViTVLConfig
from megatron_finevit.models.heads import MergeProjector
from megatron_finevit.models.llm import build_qwen3
from megatron_finevit.models.vit import FineViTModel


class FineViTVLModel(MegatronModule):
    """Submodules ``encoder`` (FineViTModel), ``projector`` (MergeProjector to the LLM hidden
    size) and ``llm`` (Qwen3 GPTModel); their checkpoint keys are prefixed accordingly."""

    def __init__(self, config: FineViTVLConfig, vit_transformer_config, llm_transformer_config):
        super().__init__(config=llm_transformer_config)
        self.vl_config = config
        self.encoder = FineViTModel(config.vit, vit_transformer_config)
        self.projector = MergeProjector(vit_transformer_config, config.llm.hidden_size,
                                        config.vit.merge_size)
        self.llm = build_qwen3(config.llm, llm_transformer_config)

    def image_features(self, encoder_input) -> torch.Tensor:
        """``encoder_input`` from ``models.vit.prepare_encoder_input(pack_images(images))`` ->
        ``[N / 4, llm hidden]``, one row per merge window in pack order."""
        hidden = encoder_input.gather_output(self.encoder(**encoder_input.model_inputs()))
        return self.projector(hidden)

    def forward(self, encoder_input, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids`` / ``position_ids`` ``[B, S]`` -> logits ``[B, S, padded vocab]``
        (causal attention when ``attention_mask`` is None)."""
        embeds = self.llm.embedding(input_ids=input_ids, position_ids=position_ids)  # [S, B, H]
        placeholders = (input_ids == self.vl_config.image_token_id).t()  # [S, B]
        if encoder_input is not None:
            features = self.image_features(encoder_input).to(embeds.dtype)
            if int(placeholders.sum()) != features.shape[0]:
                raise ValueError(f"{int(placeholders.sum())} image tokens in input_ids but the "
                                 f"images give {features.shape[0]} features (one per 2x2 window)")
            # [S, B] order: sequence-major; HF scatters batch-major, so go through [B, S].
            embeds = embeds.transpose(0, 1).clone()
            embeds[placeholders.t()] = features
            embeds = embeds.transpose(0, 1).contiguous()
        elif placeholders.any():
            raise ValueError("input_ids contain image tokens but no image was given")
        return self.llm(input_ids, position_ids, attention_mask, decoder_input=embeds)
