"""FineViT-VL HF <-> megatron parity, the megatron side (world functions for ``run_world``).

One image and a prompt holding its placeholders; every logits tensor returned here is the whole
``[1, S, vocab_size]`` (TP gathered, padded vocabulary rows dropped) from the rank(s) holding the
last pipeline stage, computed through megatron's forward-only schedule, so any layout — and the
transformers export — compare row for row.
"""

from __future__ import annotations

import zlib

import torch

from megatron_finevit.models.vit import pack_images
from megatron_finevit.testing.multirank import Layout
from megatron_finevit.testing.qwen3_parity import forward_only

SEED = 7
IMAGE_TOKEN_ID = 5
IMAGE_SIZE = (56, 84)  # (H, W) pixels: a 4 × 6 patch grid -> 6 merge windows


def tiny_vl_config():
    """A FineViT-VL with the shapes of the transformers test models (2 encoder layers, a 4-layer
    Qwen3 of width 32 over 64 ids) and a tied embedding, which PP splits between the first and
    the last stage."""
    from megatron_finevit.config.llm import Qwen3Config
    from megatron_finevit.config.vit import tiny_vit
    from megatron_finevit.config.vlm import FineViTVLConfig

    llm = Qwen3Config(num_layers=4, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                      num_query_groups=2, head_dim=8, vocab_size=64, tie_embeddings=True,
                      rope_theta=10000.0, max_position_embeddings=128)
    return FineViTVLConfig(vit=tiny_vit(num_layers=2), llm=llm, image_token_id=IMAGE_TOKEN_ID)


def parity_image() -> torch.Tensor:
    return torch.randn(3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(SEED))


def parity_prompt() -> torch.Tensor:
    """``[1, 16]``: text, one placeholder per 2×2 window of the image, text (16 tokens: the
    sequence splits over 2 or 4 sequence-parallel ranks)."""
    windows = (IMAGE_SIZE[0] // 28) * (IMAGE_SIZE[1] // 28)
    return torch.tensor([[1, 9, 3] + [IMAGE_TOKEN_ID] * windows + [11, 2, 17, 8, 4, 6, 10]])


def hf_image_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """``pixel_values`` ``[N, 588]`` and ``image_grid_thw`` ``[1, 3]``."""
    packed = pack_images([parity_image()])
    grids = torch.cat([torch.ones(len(packed.grids), 1, dtype=torch.long), packed.grids], dim=1)
    return packed.patches, grids


def build_model(config, layout: Layout, perform_initialization: bool = True):
    """This rank's ``FineViTVLModel`` at ``layout`` (megatron's groups set up here)."""
    from megatron_finevit.models.vlm import FineViTVLModel
    from megatron_finevit.platform import init_parallel, set_seed

    init_parallel(layout.parallel_config(), num_attention_heads=config.llm.num_attention_heads,
                  num_query_groups=config.llm.num_query_groups, num_layers=config.llm.num_layers)
    set_seed(SEED)
    vit_tc, llm_tc = config.to_transformer_configs(
        layout.tp, layout.pp, layout.sp, perform_initialization=perform_initialization)
    return FineViTVLModel(config, vit_tc, llm_tc)


@torch.no_grad()
def vl_logits(model, config) -> torch.Tensor | None:
    """Logits ``[1, S, vocab_size]`` of ``parity_prompt`` with ``parity_image`` through megatron's
    forward-only schedule (p2p between stages when PP > 1); None off the last stage."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    ids = parity_prompt()
    positions = torch.arange(ids.shape[1])[None]
    images = pack_images([parity_image()])
    output = forward_only(model, lambda m: m(images, ids, positions), seq_length=ids.shape[1])
    if output is None:
        return None
    logits = gather_from_tensor_model_parallel_region(output)  # [1, S, V_pad]
    return logits[..., : config.llm.vocab_size]


def perturb_norms(model) -> None:
    """Norm weights to values in [0.5, 1.5], seeded by name: megatron initialises them to 1,
    which would hide a swapped or dropped norm; TP replicas get the same values."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)


# --- world functions ---------------------------------------------------------------------------


def convert_world(rank: int, world_size: int, hf_dir: str, mcore_dir: str,
                  back_dir: str) -> dict:
    """One rank: HF -> megatron (checked to split at TP 2 x PP 2) -> HF with the conversion
    pipeline; the converted checkpoint's logits at TP = PP = 1."""
    from megatron_finevit.convert.pipeline import hf_to_megatron, load_model_config, megatron_to_hf
    from megatron_finevit.platform.parallel import destroy_parallel
    from megatron_finevit.testing.gpt_parity import load_checkpoint

    assert world_size == 1
    hf_to_megatron("finevit-vl", hf_dir, mcore_dir, 2, 2, progress=False)
    megatron_to_hf("finevit-vl", mcore_dir, back_dir, progress=False)
    config = load_model_config("finevit-vl", mcore_dir)
    model = build_model(config, Layout(), perform_initialization=False)
    load_checkpoint(model, mcore_dir)
    logits = vl_logits(model, config)
    destroy_parallel()
    return {"logits": logits}


def layouts_world(rank: int, world_size: int, mcore_dir: str, layouts: list[Layout],
                  export_config, export_layouts: dict, export_dirs: dict) -> dict:
    """Two checks in one world.

    ``loaded``: each of ``layouts`` loads the converted checkpoint ``mcore_dir`` (megatron
    reshards) and returns its logits. ``exported``: for each name, a random FineViT-VL
    (``export_config``) at ``export_layouts[name]`` is saved to ``export_dirs[name]`` as a trainer
    saves, and returns its logits, to compare with transformers on the HF export.
    """
    from megatron_finevit.convert.pipeline import load_model_config
    from megatron_finevit.testing.gpt_parity import load_checkpoint, save_checkpoint

    config = load_model_config("finevit-vl", mcore_dir)
    loaded = {}
    for layout in layouts:
        model = build_model(config, layout, perform_initialization=False)
        load_checkpoint(model, mcore_dir)
        loaded[layout.label] = vl_logits(model, config)
    exported = {}
    for name, layout in export_layouts.items():
        model = build_model(export_config, layout)
        perturb_norms(model)
        save_checkpoint(model, export_dirs[name])
        exported[name] = vl_logits(model, export_config)
    return {"loaded": loaded, "exported": exported, "cp2_error": _cp_refusal(export_config)}


def _cp_refusal(config) -> str:
    """The error building FineViT-VL in a context-parallel world gives (2 ranks)."""
    from megatron_finevit.models.vlm import FineViTVLModel
    from megatron_finevit.platform import ParallelConfig, init_parallel

    init_parallel(ParallelConfig(context_parallel=2))
    try:
        FineViTVLModel(config, *config.to_transformer_configs())
    except ValueError as exc:
        return str(exc)
    return ""


# --- one training step at any layout against the single-rank run --------------------------------

TRAIN_IMAGES = [[(56, 84)], [(28, 56), (56, 28)]]  # (H, W) pixels per micro-batch
TRAIN_SEQ_LENGTH = 16


def train_microbatches(config) -> list[dict]:
    """Two micro-batches of ``[1, 16]`` prompts (random text around one placeholder per merge
    window of their images) with next-token labels; the loss counts text targets only."""
    batches = []
    for index, sizes in enumerate(TRAIN_IMAGES):
        generator = torch.Generator().manual_seed(SEED + index)
        images = pack_images([torch.randn(3, h, w, generator=generator) for h, w in sizes])
        windows = sum(h * w // (28 * 28) for h, w in sizes)
        text = torch.randint(IMAGE_TOKEN_ID + 1, config.llm.vocab_size,
                             (TRAIN_SEQ_LENGTH - windows,), generator=generator)
        ids = torch.cat([text[:3], torch.full((windows,), IMAGE_TOKEN_ID), text[3:]])[None]
        labels = torch.cat([ids[:, 1:], torch.zeros(1, 1, dtype=torch.long)], dim=1)
        loss_mask = (labels != IMAGE_TOKEN_ID).float()
        loss_mask[:, -1] = 0.0
        batches.append({"images": images, "ids": ids, "labels": labels, "loss_mask": loss_mask,
                        "positions": torch.arange(TRAIN_SEQ_LENGTH)[None]})
    return batches


def _train_forward_step(data_iterator, model):
    batch = next(data_iterator)
    per_token = model(batch["images"], batch["ids"], batch["positions"], labels=batch["labels"])

    def loss_func(losses):
        mask = batch["loss_mask"]
        loss = (losses * mask).sum() / mask.sum()
        return loss, {"loss": loss.detach().clone()}  # megatron scales the loss in place

    return per_token, loss_func


def train_one_step(config, layout: Layout, ckpt_dir: str, save: bool) -> tuple:
    """This rank's FineViT-VL (DDP-wrapped) at ``layout`` with the weights in ``ckpt_dir``
    (``save``: random ones with perturbed norms, written there first), one Adam step (lr 1,
    eps 1, as ``gpt_parity``) over ``train_microbatches``. Returns (model, loss on the last stage
    else None, grad norm, {name: grad})."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_finevit.testing.gpt_parity import make_optimizer, train_step
    from megatron_finevit.testing.gpt_parity import load_checkpoint, save_checkpoint

    model = build_model(config, layout, perform_initialization=save)
    if save:
        perturb_norms(model)
        save_checkpoint(model, ckpt_dir)
    else:
        load_checkpoint(model, ckpt_dir)
    model = DistributedDataParallel(model.config,
                                    DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = make_optimizer(model, distributed_optimizer=False, lr=1.0, adam_eps=1.0)
    batches = train_microbatches(config)
    loss, grad_norm, grads = train_step(model, optimizer, iter(batches), len(batches),
                                        TRAIN_SEQ_LENGTH, 1, forward_step_func=_train_forward_step,
                                        loss_key="loss")
    return model, loss, grad_norm, grads


def train_oracle_world(rank: int, world_size: int, config, ckpt_dir: str) -> dict:
    """One rank: the oracle step; its initial weights go to ``ckpt_dir``."""
    assert world_size == 1
    model, loss, grad_norm, grads = train_one_step(config, Layout(), ckpt_dir, save=True)
    weights = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    return {"loss": loss, "grad_norm": grad_norm, "grads": grads, "weights": weights}


def train_layouts_world(rank: int, world_size: int, ckpt_dir: str, oracle: dict,
                        runs: dict) -> dict:
    """Each run (name -> (config, layout); configs may differ in their pipeline split only)
    steps from the oracle's initial weights: max abs differences of loss, grad norm, gradients
    and updated weights against the oracle's matching TP shards, by name."""
    from megatron.core import parallel_state

    from megatron_finevit.testing.gpt_parity import step_diffs

    report = {}
    for run_name, (config, layout) in runs.items():
        model, loss, grad_norm, grads = train_one_step(config, layout, ckpt_dir, save=False)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        report[run_name] = step_diffs(model.module, loss, grad_norm, grads, oracle, layout.tp,
                                      tp_rank, oracle_name=_tied_output_as_embedding(oracle))
    return report


def _tied_output_as_embedding(oracle: dict):
    """A tied output layer on the last stage has no single-rank parameter of its own: it is the
    first stage's embedding, kept in step with it by megatron (equal weights, all-reduced
    gradients)."""
    def rename(name: str) -> str:
        if name not in oracle["grads"] and name.endswith("output_layer.weight"):
            return "llm.embedding.word_embeddings.weight"
        return name
    return rename
