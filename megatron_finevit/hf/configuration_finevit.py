"""transformers configs for the exported FineViT encoder and the FineViT-VL model.

``FineViTHFConfig`` (``model_type`` "finevit") mirrors ``config.vit.FineViTConfig`` under
transformers' field names; ``FineViTVLHFConfig`` ("finevit_vl") holds a ``vision_config``
(FineViT), a ``text_config`` (transformers' ``Qwen3Config``), the projector's merge size and the
id of the image placeholder token that image features replace.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


@strict
class FineViTHFConfig(PreTrainedConfig):
    """The encoder: ``patch_size``² · ``in_channels`` values per patch -> ``hidden_size``
    features per patch; images are packed lists of patches (merge-window-major order)."""

    model_type = "finevit"
    base_config_key = "vision_config"

    hidden_size: int = 1536
    intermediate_size: int = 4608
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    patch_size: int = 14
    in_channels: int = 3
    merge_size: int = 2
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size * self.patch_size

    def validate_architecture(self) -> None:
        if self.hidden_size % self.num_attention_heads or self.head_dim % 4:
            raise ValueError(f"hidden_size={self.hidden_size} / num_attention_heads="
                             f"{self.num_attention_heads} must give a head_dim divisible by 4 "
                             "(2D RoPE)")


@strict
class FineViTVLHFConfig(PreTrainedConfig):
    """FineViT + 2×2 merge projector + Qwen3 language model."""

    model_type = "finevit_vl"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=FineViTHFConfig),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 151655  # Qwen2-VL's <|image_pad|>
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # the language model's own flag decides; keep the composite's in step with it
        self.tie_word_embeddings = bool(self.text_config.tie_word_embeddings)
