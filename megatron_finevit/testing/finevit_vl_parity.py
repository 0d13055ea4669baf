"""FineViT-VL parity checks, the megatron side (world functions for ``run_world``).

HF <-> megatron: one image and a prompt holding its placeholders; every logits tensor returned
here is the whole ``[1, S, vocab_size]`` (TP gathered, padded vocabulary rows dropped) from the
rank(s) holding the last pipeline stage, computed through megatron's forward-only schedule, so
any layout — and the transformers export — compare row for row.

Training: one step at any layout against the single-rank step, on plain ``[1, 16]`` prompts or
on packed multimodal ``[1, 32]`` micro-batches (``packed_batch``); and packing isolation — each
sample's loss and gradients from a pack against the sample run alone (``packing_isolation``).
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
        layout.tp, layout.pp, layout.sp, context_parallel=layout.cp,
        perform_initialization=perform_initialization)
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
    return {"loaded": loaded, "exported": exported}


# --- samples, alone or packed ------------------------------------------------------------------


def vl_sample(config, sizes, length: int, generator: torch.Generator) -> dict:
    """One sample of ``length`` tokens: 3 text tokens, one placeholder per merge window of each
    image (``sizes``: (H, W) pixels), then text; next-token labels within the sample and a loss
    mask on text targets that never reaches past the sample's last token. Keys: ``images`` (list
    of ``[3, H, W]``), ``ids`` / ``labels`` int64 ``[n]``, ``loss_mask`` float ``[n]``."""
    images = [torch.randn(3, h, w, generator=generator) for h, w in sizes]
    windows = sum(h * w // (28 * 28) for h, w in sizes)
    text = torch.randint(IMAGE_TOKEN_ID + 1, config.llm.vocab_size, (length - windows,),
                         generator=generator)
    ids = torch.cat([text[:3], torch.full((windows,), IMAGE_TOKEN_ID), text[3:]])
    labels = torch.cat([ids[1:], torch.zeros(1, dtype=torch.long)])
    loss_mask = (labels != IMAGE_TOKEN_ID).float()
    loss_mask[-1] = 0.0
    return {"images": images, "ids": ids, "labels": labels, "loss_mask": loss_mask}


def alone_batch(sample: dict) -> dict:
    """A sample as an unpacked ``[1, n]`` micro-batch (causal over the row, positions 0..n-1)."""
    batch = {key: sample[key][None] for key in ("ids", "labels", "loss_mask")}
    return {**batch, "images": pack_images(sample["images"]),
            "positions": torch.arange(len(sample["ids"]))[None]}


def packed_batch(config, samples: list[dict], budget: int, seed: int = SEED,
                 image_budget: int | None = None) -> dict:
    """Samples back to back in one ``[1, budget]`` THD micro-batch: one segment each, the tail
    (random non-image ids and labels, masked) a segment of its own, positions restarting per
    segment; images in pack order (their patches padded to ``image_budget`` rows when given).
    ``sample_masks`` ``[k, budget]`` picks each sample's loss terms."""
    from megatron_finevit.models.llm.packing import segment_positions, thd_packed_seq_params

    lengths = [len(sample["ids"]) for sample in samples]
    tail = budget - sum(lengths)
    if tail < 0:
        raise ValueError(f"{sum(lengths)} tokens do not fit a budget of {budget}")
    columns = {key: [sample[key] for sample in samples] for key in ("ids", "labels", "loss_mask")}
    if tail:
        generator = torch.Generator().manual_seed(seed)
        for key in ("ids", "labels"):
            columns[key].append(torch.randint(IMAGE_TOKEN_ID + 1, config.llm.vocab_size, (tail,),
                                              generator=generator))
        columns["loss_mask"].append(torch.zeros(tail))
    cu_seqlens = torch.cumsum(torch.tensor([0] + lengths + ([tail] if tail else [])), 0).int()
    masks = torch.zeros(len(samples), budget)
    for index, sample in enumerate(samples):
        start = int(cu_seqlens[index])
        masks[index, start:start + lengths[index]] = sample["loss_mask"]
    batch = {key: torch.cat(values)[None] for key, values in columns.items()}
    images = pack_images([img for sample in samples for img in sample["images"]],
                         pad_to=image_budget)
    return {**batch, "images": images,
            "positions": segment_positions(cu_seqlens)[None],
            "params": thd_packed_seq_params(cu_seqlens), "sample_masks": masks}


# --- one training step at any layout against the single-rank run --------------------------------

TRAIN_IMAGES = [[(56, 84)], [(28, 56), (56, 28)]]  # (H, W) pixels per micro-batch
TRAIN_SEQ_LENGTH = 16
# Packed micro-batches: (image sizes, tokens) per sample, and the fixed budget (even: TP2 + SP).
TRAIN_PACKS = [[([(56, 84)], 11), ([(28, 56)], 9), ([(56, 56)], 10)],
               [([(28, 28)], 12), ([(56, 28)], 14)]]
TRAIN_PACK_BUDGET = 32
TRAIN_PACK_IMAGE_BUDGET = 52  # patch rows per pack (48 and 12 real), padded as a data loader does


def train_microbatches(config) -> list[dict]:
    """Two micro-batches of ``[1, 16]`` prompts (random text around one placeholder per merge
    window of their images) with next-token labels; the loss counts text targets only."""
    return [alone_batch(vl_sample(config, sizes, TRAIN_SEQ_LENGTH,
                                  torch.Generator().manual_seed(SEED + index)))
            for index, sizes in enumerate(TRAIN_IMAGES)]


def pad_sample(sample: dict, multiple: int) -> dict:
    """``sample`` with its tokens padded to a multiple of ``multiple`` (a non-image id, no loss),
    as the loader pads each sample for context parallelism (segments of ``2·cp`` tokens)."""
    pad = -len(sample["ids"]) % multiple
    return {**sample,
            "ids": torch.cat([sample["ids"], torch.full((pad,), IMAGE_TOKEN_ID + 1)]),
            "labels": torch.cat([sample["labels"], torch.zeros(pad, dtype=torch.long)]),
            "loss_mask": torch.cat([sample["loss_mask"], torch.zeros(pad)])}


def packed_train_microbatches(config, segment_multiple: int = 1) -> list[dict]:
    """``TRAIN_PACKS`` as two ``[1, 32]`` THD packs (samples of 9-14 tokens, padded tails; image
    patches padded to 52 rows). ``segment_multiple`` > 1 (context parallelism): every sample
    padded to a multiple of it (``pad_sample``) in packs of ``32 + 2·segment_multiple``."""
    budget = TRAIN_PACK_BUDGET + (2 * segment_multiple if segment_multiple > 1 else 0)
    batches = []
    for index, pack in enumerate(TRAIN_PACKS):
        generator = torch.Generator().manual_seed(SEED + 100 + index)
        samples = [pad_sample(vl_sample(config, sizes, length, generator), segment_multiple)
                   for sizes, length in pack]
        batches.append(packed_batch(config, samples, budget, seed=SEED + index,
                                    image_budget=TRAIN_PACK_IMAGE_BUDGET))
    return batches


def _train_forward_step(data_iterator, model):
    batch = next(data_iterator)
    per_token = model(batch["images"], batch["ids"], batch["positions"], labels=batch["labels"],
                      packed_seq_params=batch.get("params"))

    def loss_func(losses):
        mask = batch["loss_mask"]
        loss = (losses * mask).sum() / mask.sum()
        return loss, {"loss": loss.detach().clone()}  # megatron scales the loss in place

    return per_token, loss_func


def train_one_step(config, layout: Layout, ckpt_dir: str, save: bool,
                   packed: bool = False, segment_multiple: int = 1) -> tuple:
    """This rank's FineViT-VL (DDP-wrapped) at ``layout`` with the weights in ``ckpt_dir``
    (``save``: random ones with perturbed norms, written there first), one Adam step (lr 1,
    eps 1, as ``gpt_parity``) over ``train_microbatches`` (``packed``:
    ``packed_train_microbatches(config, segment_multiple)``). Returns (model, loss on the last
    stage else None, grad norm, {name: grad})."""
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
    batches = (packed_train_microbatches(config, segment_multiple) if packed
               else train_microbatches(config))
    loss, grad_norm, grads = train_step(model, optimizer, iter(batches), len(batches),
                                        batches[0]["ids"].shape[1], 1,
                                        forward_step_func=_train_forward_step, loss_key="loss")
    return model, loss, grad_norm, grads


def train_oracle_world(rank: int, world_size: int, config, ckpt_dir: str,
                       packed: bool = False, segment_multiple: int = 1) -> dict:
    """One rank: the oracle step; its initial weights go to ``ckpt_dir``."""
    assert world_size == 1
    model, loss, grad_norm, grads = train_one_step(config, Layout(), ckpt_dir, save=True,
                                                   packed=packed,
                                                   segment_multiple=segment_multiple)
    weights = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    return {"loss": loss, "grad_norm": grad_norm, "grads": grads, "weights": weights}


def train_layouts_world(rank: int, world_size: int, ckpt_dir: str, oracle: dict,
                        runs: dict, packed: bool = False, segment_multiple: int = 1) -> dict:
    """Each run (name -> (config, layout); configs may differ in their pipeline split only)
    steps from the oracle's initial weights (on the oracle's micro-batches: ``packed`` or not,
    ``segment_multiple``):
    max abs differences of loss, grad norm, gradients and updated weights against the oracle's
    matching TP shards, by name."""
    from megatron.core import parallel_state

    from megatron_finevit.testing.gpt_parity import step_diffs

    report = {}
    for run_name, (config, layout) in runs.items():
        model, loss, grad_norm, grads = train_one_step(config, layout, ckpt_dir, save=False,
                                                       packed=packed,
                                                       segment_multiple=segment_multiple)
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


# --- packing: a pack gives each sample's loss and gradients as that sample alone ------------------

ISOLATION_SAMPLES = [([(56, 84)], 13), ([(28, 56)], 8), ([(56, 56)], 11)]  # (images, tokens)
ISOLATION_PADDING = 9          # text tokens after the samples
ISOLATION_IMAGE_BUDGET = 60    # patch rows: the images' 48 and a padding segment


def _masked_losses_and_grads(model, batch: dict, masks: torch.Tensor) -> list[tuple]:
    """For each mask ``[S]`` of ``masks`` ``[k, S]``: (that mask's per-token losses ``[m]`` of
    ``batch`` in token order, the gradients of their sum, one per parameter). One forward per
    mask: megatron's vocab-parallel cross-entropy backward reuses its saved softmax in place, so
    its graph cannot be walked twice."""
    params = list(model.parameters())
    results = []
    for mask in masks:
        per_token = model(batch["images"], batch["ids"], batch["positions"],
                          labels=batch["labels"], packed_seq_params=batch.get("params"))[0]  # [S]
        grads = torch.autograd.grad((per_token * mask).sum(), params)
        results.append((per_token[mask > 0].detach(), [g.detach() for g in grads]))
    return results


def _isolation_diffs(got: list[tuple], alone: list[tuple]) -> dict:
    """Worst relative differences over the samples: loss sum, per-token loss, and each
    parameter's gradient (max |difference| / max |alone|)."""
    diffs = {"loss": 0.0, "token_loss": 0.0, "grad": 0.0}
    for (losses, grads), (ref_losses, ref_grads) in zip(got, alone, strict=True):
        diffs["loss"] = max(diffs["loss"], ((losses.sum() - ref_losses.sum()).abs()
                                            / ref_losses.sum().abs()).item())
        diffs["token_loss"] = max(diffs["token_loss"], ((losses - ref_losses).abs().max()
                                                        / ref_losses.abs().max()).item())
        for grad, ref in zip(grads, ref_grads, strict=True):
            diffs["grad"] = max(diffs["grad"], ((grad - ref).abs().max()
                                                / ref.abs().max().clamp_min(1e-30)).item())
    return diffs


def packing_isolation(config) -> dict:
    """Single rank, fp32: ``ISOLATION_SAMPLES`` (one image of a different size each) run alone
    (unpacked) against the same samples packed — tight (``packed``), with a random masked text
    tail and a padding segment after the image patches (``padded``) and, as a check that the
    comparison can fail, as one plain causal row with no segments (``unsegmented``: later
    samples see earlier ones). Returns each one's
    ``_isolation_diffs`` and ``grad_scale``, the smallest max |gradient| of any parameter alone."""
    model = build_model(config, Layout())
    perturb_norms(model)
    generator = torch.Generator().manual_seed(SEED + 200)
    samples = [vl_sample(config, sizes, length, generator)
               for sizes, length in ISOLATION_SAMPLES]
    alone = [_masked_losses_and_grads(model, alone_batch(s), s["loss_mask"][None])[0]
             for s in samples]
    tight = sum(length for _, length in ISOLATION_SAMPLES)
    report = {"grad_scale": min(g.abs().max().item() for _, grads in alone for g in grads)}
    for name, budget, image_budget in (("packed", tight, None),
                                       ("padded", tight + ISOLATION_PADDING,
                                        ISOLATION_IMAGE_BUDGET)):
        batch = packed_batch(config, samples, budget, image_budget=image_budget)
        report[name] = _isolation_diffs(
            _masked_losses_and_grads(model, batch, batch["sample_masks"]), alone)
    unsegmented = packed_batch(config, samples, tight)
    del unsegmented["params"]
    unsegmented["positions"] = torch.arange(tight)[None]
    report["unsegmented"] = _isolation_diffs(
        _masked_losses_and_grads(model, unsegmented, unsegmented["sample_masks"]), alone)
    return report


def packed_oracle_world(rank: int, world_size: int, config, ckpt_dir: str) -> dict:
    """One rank: ``packing_isolation``, then the packed training step's oracle (initial weights
    to ``ckpt_dir``)."""
    return {"isolation": packing_isolation(config),
            "oracle": train_oracle_world(rank, world_size, config, ckpt_dir, packed=True)}


def packed_layouts_world(rank: int, world_size: int, ckpt_dir: str, oracle: dict,
                         runs: dict) -> dict:
    """The packed training step at each of ``runs`` against the oracle (``train_layouts_world``),
    and the error a TP2 + SP model gives for a pack whose budget does not split over TP."""
    steps = train_layouts_world(rank, world_size, ckpt_dir, oracle, runs, packed=True)
    config = next(iter(runs.values()))[0]
    model = build_model(config, Layout(tp=2, sp=True))
    generator = torch.Generator().manual_seed(SEED)
    samples = [vl_sample(config, sizes, length, generator) for sizes, length in TRAIN_PACKS[0]]
    odd = packed_batch(config, samples, sum(length for _, length in TRAIN_PACKS[0]) + 1)
    try:
        model(odd["images"], odd["ids"], odd["positions"], labels=odd["labels"],
              packed_seq_params=odd["params"])
        refusal = ""
    except ValueError as exc:
        refusal = str(exc)
    return {"steps": steps, "sp_refusal": refusal}
