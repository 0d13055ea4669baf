"""A Stage II (contrastive) checkpoint as benchmark ``Encoders``, in one process.

The model is built by the stage (``ContrastiveStage.build_model``) and its weights loaded from
the checkpoint as ``checkpoint.load_dir`` does (weights only: a Stage I checkpoint under a
Stage II config gives the model Stage II starts from). No optimiser, DDP or data loader: the
training shards the config names need not exist where the benchmarks run.

Inputs follow the run's schedules at the checkpoint's step: images are resized with that step's
``max_pixels`` (336² → 448² in the paper) and captions tokenised to that step's text context
(64 → 256 tokens; longer captions are cut by the tokenizer, keeping EOS). The aspect-ratio limit
of curation is lifted (a benchmark scores every image).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from megatron_finevit.data.decode_pil import decode_pil
from megatron_finevit.evaluation.benchmarks import Encoders

# smart_resize's aspect limit in Qwen2-VL; ours (3) is a curation filter, not a model limit
EVAL_MAX_ASPECT_RATIO = 200.0


def load_contrastive_model(cfg, stage, checkpoint_dir: str):
    """Build ``stage``'s model (TP = PP = CP = 1, this process) and load the newest checkpoint
    of ``checkpoint_dir`` into it: returns (the model in eval mode, the checkpoint's step)."""
    from megatron.core import dist_checkpointing

    from megatron_finevit.platform import (
        ParallelConfig,
        detect_backend,
        init_distributed,
        init_parallel,
        set_seed,
    )
    from megatron_finevit.training.checkpoint_files import reading_checkpoint
    from megatron_finevit.training.checkpointing import latest_checkpoint, load_checkpoint

    init_distributed(detect_backend(cfg.device))
    init_parallel(ParallelConfig(), **stage.model_dims())
    set_seed(cfg.seed)
    model = stage.build_model(pre_process=True, post_process=True)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    path = latest_checkpoint(checkpoint_dir)
    load_checkpoint(path, model, None, None, weights_only=True)
    with reading_checkpoint(path):
        common = dist_checkpointing.load_common_state_dict(str(path))["common"]
    return model.eval(), int(common["train_state"]["step"])


def contrastive_encoders(stage, model, step: int) -> Encoders:
    """``Encoders`` of a ``ContrastiveModel`` at training step ``step``'s resolution and text
    context: unit-norm image embeddings from the MAP head, text embeddings from the tower."""
    from megatron_finevit.models.vit import pack_images, prepare_encoder_input

    policy = [p for start, p in stage.phases() if start <= step][-1]
    policy = dataclasses.replace(policy, max_aspect_ratio=EVAL_MAX_ASPECT_RATIO)
    context = stage.context_at(step)
    parameter = next(model.encoder.parameters())

    @torch.no_grad()
    def embed_images(images: list[torch.Tensor]) -> torch.Tensor:
        inp = prepare_encoder_input(pack_images(images))  # [t, C·p·p], one segment per image
        inp.patches = inp.patches.to(parameter.device, parameter.dtype)
        hidden = model.encoder(**inp.model_inputs())  # [t, 1, h]
        # ContrastiveModel.forward's image half (its text half needs captions of these images)
        real = inp.gather_output(hidden, None)
        pooled = model.map_head(real, inp.cu_seqlens[:inp.grids.shape[0] + 1])
        return F.normalize(pooled.float(), dim=-1)

    @torch.no_grad()
    def embed_texts(texts: list[str]) -> torch.Tensor:
        ids, _ = stage.tokenizer.encode(texts, context)  # [n, context], cut to the context
        return F.normalize(model.text_tower(ids.to(parameter.device)).float(), dim=-1)

    return Encoders(decode=lambda data: decode_pil(data, policy), embed_images=embed_images,
                    embed_texts=embed_texts)
