"""FineViT encoder: patch embedding, 2D RoPE, input layout (packing, CP) and the model."""

from megatron_finevit.models.vit.encoder import FineViTModel
from megatron_finevit.models.vit.layout import EncoderInput, prepare_encoder_input
from megatron_finevit.models.vit.patch_embed import (
    PackedImages,
    PatchEmbedding,
    check_image_size,
    image_to_patches,
    pack_images,
)
from megatron_finevit.models.vit.rope2d import image_rope_angles, packed_rope_freqs

__all__ = [
    "FineViTModel",
    "EncoderInput",
    "prepare_encoder_input",
    "PackedImages",
    "PatchEmbedding",
    "check_image_size",
    "image_to_patches",
    "pack_images",
    "image_rope_angles",
    "packed_rope_freqs",
]
