"""FineViT-VL as a transformers model: FineViT -> 2×2 merge projector -> Qwen3 language model.

The prompt holds one image placeholder token (``config.image_token_id``) per merge window of each
image, in pack order (``h·w/4`` for an ``h × w`` patch grid, as Qwen2-VL's processor expands
``<|image_pad|>``); their input embeddings are replaced by the projected image features, the
rest of the prompt is embedded as usual, and ``Qwen3ForCausalLM`` runs on the result.
``generate()`` feeds ``pixel_values`` only at the prefill step (transformers drops
multimodal inputs after it), so decoding uses the KV cache like any causal LM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, Qwen3ForCausalLM

from megatron_finevit.hf.configuration_finevit import FineViTHFConfig, FineViTVLHFConfig
from megatron_finevit.hf.modeling_finevit import FineViTHFModel


class FineViTMergeProjector(nn.Module):
    """RMSNorm -> concatenate each 2×2 window's 4 consecutive tokens -> Linear(4h, 4h) -> GELU
    -> Linear(4h, out): ``[N, h]`` -> ``[N / 4, out]`` (``models.heads.MergeProjector``)."""

    def __init__(self, vision: FineViTHFConfig, out_dim: int):
        super().__init__()
        self.window = vision.merge_size ** 2
        merged = vision.hidden_size * self.window
        self.norm = nn.RMSNorm(vision.hidden_size, eps=vision.rms_norm_eps)
        self.fc1 = nn.Linear(merged, merged)
        self.fc2 = nn.Linear(merged, out_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        merged = self.norm(hidden).reshape(-1, self.window * hidden.shape[-1])
        return self.fc2(F.gelu(self.fc1(merged)))


class FineViTVLForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = FineViTVLHFConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["FineViTLayer", "Qwen3DecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: FineViTVLHFConfig):
        super().__init__(config)
        self.visual = FineViTHFModel(config.vision_config)
        self.projector = FineViTMergeProjector(config.vision_config,
                                               config.text_config.hidden_size)
        self.language_model = Qwen3ForCausalLM(config.text_config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, FineViTMergeProjector):
            std = self.config.vision_config.initializer_range
            for linear in (module.fc1, module.fc2):
                linear.weight.normal_(0.0, std)
                linear.bias.zero_()
            module.norm.weight.fill_(1.0)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def get_image_features(self, pixel_values: torch.Tensor,
                           image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Packed patches ``[N, C·p·p]`` + grids ``[n, 3]`` -> ``[N / 4, text hidden]``."""
        hidden = self.visual(pixel_values, image_grid_thw).last_hidden_state
        return self.projector(hidden)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings ``[B, S, hidden]`` with image placeholders replaced by features."""
        embeds = self.get_input_embeddings()(input_ids)
        placeholders = input_ids == self.config.image_token_id
        if pixel_values is None:
            if placeholders.any():
                raise ValueError("input_ids contain image tokens but no pixel_values were given")
            return embeds
        if image_grid_thw is None:
            raise ValueError("pixel_values need image_grid_thw")
        features = self.get_image_features(pixel_values, image_grid_thw).to(embeds.dtype)
        if int(placeholders.sum()) != features.shape[0]:
            raise ValueError(f"{int(placeholders.sum())} image tokens in input_ids but the images "
                             f"give {features.shape[0]} features (one per 2x2 patch window)")
        return embeds.masked_scatter(placeholders[..., None].expand_as(embeds), features)

    def forward(self, input_ids: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs):
        """``input_ids`` ``[B, S]`` (or ``inputs_embeds``) and optional images; every other
        argument (attention_mask, past_key_values, labels, use_cache …) goes to the language
        model. Returns its ``CausalLMOutputWithPast``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_grid_thw)
        elif pixel_values is not None:
            raise ValueError("pixel_values with inputs_embeds: embed the images with "
                             "embed_inputs() first")
        return self.language_model(inputs_embeds=inputs_embeds, **kwargs)
