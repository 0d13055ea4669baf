"""FineViT-VL HF <-> megatron parity, the megatron side (one spawned rank).

``convert_world``: an HF ``save_pretrained`` directory -> megatron (``hf_to_megatron``) -> HF
(``megatron_to_hf``); the converted megatron checkpoint is loaded into a fresh
``FineViTVLModel``, which computes logits for one image and a prompt holding its placeholders.
"""

from __future__ import annotations

import torch

from megatron_finevit.models.vit import pack_images

SEED = 7
IMAGE_TOKEN_ID = 5
IMAGE_SIZE = (56, 84)  # (H, W) pixels: a 4 × 6 patch grid -> 6 merge windows


def parity_image() -> torch.Tensor:
    return torch.randn(3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(SEED))


def parity_prompt() -> torch.Tensor:
    """``[1, S]``: text, one placeholder per 2×2 window of the image, text."""
    windows = (IMAGE_SIZE[0] // 28) * (IMAGE_SIZE[1] // 28)
    return torch.tensor([[1, 9, 3] + [IMAGE_TOKEN_ID] * windows + [11, 2, 17, 8]])


def hf_image_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """``pixel_values`` ``[N, 588]`` and ``image_grid_thw`` ``[1, 3]``."""
    packed = pack_images([parity_image()])
    grids = torch.cat([torch.ones(len(packed.grids), 1, dtype=torch.long), packed.grids], dim=1)
    return packed.patches, grids


def convert_world(rank: int, world_size: int, hf_dir: str, mcore_dir: str,
                  back_dir: str) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_finevit.convert.pipeline import hf_to_megatron, load_model_config, megatron_to_hf
    from megatron_finevit.convert.registry import get_converter
    from megatron_finevit.models.vit import prepare_encoder_input
    from megatron_finevit.platform import ParallelConfig, init_parallel
    from megatron_finevit.platform.parallel import destroy_parallel

    assert world_size == 1
    hf_to_megatron("finevit-vl", hf_dir, mcore_dir, progress=False)
    megatron_to_hf("finevit-vl", mcore_dir, back_dir, progress=False)

    converter = get_converter("finevit-vl")
    config = load_model_config("finevit-vl", mcore_dir)
    init_parallel(ParallelConfig())
    model = converter.build_model(
        config, converter.transformer_config(config, perform_initialization=False)).eval()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), mcore_dir))
    ids = parity_prompt()
    with torch.no_grad():
        logits = model(prepare_encoder_input(pack_images([parity_image()])), ids,
                       torch.arange(ids.shape[1])[None])
    destroy_parallel()
    return {"logits": logits[..., : config.llm.vocab_size].detach().clone()}
