"""Model and run configuration: dataclass presets."""

from megatron_finevit.config.vit import (
    VIT_PRESETS,
    FineViTConfig,
    finevit_0p86b,
    tiny_vit,
    vit_preset,
)
