"""FineViT megatron <-> transformers export parity, the megatron side (one spawned rank).

``export_world``: a tiny random FineViT (norm weights randomised too, so they matter) and a
merge projector encode a pack of images of different sizes; the encoder is saved as a trainer
saves it (megatron ``dist_checkpointing``), converted to HF (``megatron_to_hf``), converted back
(``hf_to_megatron``), and the re-imported checkpoint is loaded into a fresh model and run again.
It also imports a ``save_pretrained`` directory of the HF class (for the HF -> megatron -> HF
round trip). The test compares all of it with ``AutoModel.from_pretrained`` on the export.
"""

from __future__ import annotations

import os

import torch

from megatron_finevit.config.vit import tiny_vit
from megatron_finevit.models.vit import pack_images, prepare_encoder_input

SEED = 2024
VIT = tiny_vit(num_layers=2)
LLM_DIM = 40
IMAGE_SIZES = [(56, 84), (28, 28), (84, 56)]  # (H, W) pixels: 24, 4 and 24 patches


def parity_images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    return [torch.randn(3, h, w, generator=g) for h, w in IMAGE_SIZES]


def hf_inputs(images) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL-style ``pixel_values`` ``[N, 588]`` and ``image_grid_thw`` ``[n, 3]``."""
    packed = pack_images(images)
    grids = torch.cat([torch.ones(len(packed.grids), 1, dtype=torch.long), packed.grids], dim=1)
    return packed.patches, grids


def _encode(model, images) -> torch.Tensor:
    inp = prepare_encoder_input(pack_images(images))
    with torch.no_grad():
        return inp.gather_output(model(**inp.model_inputs()))


def export_world(rank: int, world_size: int, mcore_dir: str, hf_dir: str,
                 reimported_dir: str, saved_hf_dir: str, saved_mcore_dir: str,
                 wrapped_dir: str, wrapped_hf_dir: str) -> dict:
    """megatron -> HF (``hf_dir``) -> megatron (``reimported_dir``), and ``hf_to_megatron`` of a
    transformers ``save_pretrained`` directory ``saved_hf_dir`` into ``saved_mcore_dir``. The
    same weights saved as a trainer saves them (under ``encoder.``, with the mask token) into
    ``wrapped_dir`` are exported to ``wrapped_hf_dir`` with ``megatron_prefix``."""
    from megatron_finevit.convert.mcore_io import save_model_checkpoint
    from megatron_finevit.convert.pipeline import hf_to_megatron, megatron_to_hf
    from megatron_finevit.models.heads import MergeProjector
    from megatron_finevit.models.vit import FineViTModel
    from megatron_finevit.platform import ParallelConfig, init_parallel, set_seed
    from megatron_finevit.platform.parallel import destroy_parallel

    assert world_size == 1
    init_parallel(ParallelConfig())
    set_seed(SEED)
    config = VIT.to_transformer_config()
    model = FineViTModel(VIT, config, mask_token=True).eval()  # the mask token is not exported
    projector = MergeProjector(config, LLM_DIM).eval()
    with torch.no_grad():
        for module in (model, projector):
            for name, p in module.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
    images = parity_images()
    features = _encode(model, images)
    projected = projector(features)
    os.makedirs(mcore_dir, exist_ok=True)
    save_model_checkpoint(model, mcore_dir)
    from megatron.core import dist_checkpointing

    os.makedirs(wrapped_dir, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(prefix="encoder."), wrapped_dir)
    destroy_parallel()

    export = megatron_to_hf("finevit", mcore_dir, hf_dir, config=VIT, progress=False)
    megatron_to_hf("finevit", wrapped_dir, wrapped_hf_dir, config=VIT, progress=False,
                   megatron_prefix="encoder.")
    reimport = hf_to_megatron("finevit", hf_dir, reimported_dir, progress=False)
    hf_to_megatron("finevit", saved_hf_dir, saved_mcore_dir, progress=False)

    init_parallel(ParallelConfig())
    fresh = FineViTModel(VIT, VIT.to_transformer_config(perform_initialization=False)).eval()
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), reimported_dir))
    return {"features": features, "projected": projected.detach(),
            "projector_state": {k: v.detach().clone() for k, v in projector.state_dict().items()
                                if not k.endswith("_extra_state")},
            "reimported_features": _encode(fresh, images),
            "export_files": export["files"], "reimport_tensors": reimport["tensors"]}
