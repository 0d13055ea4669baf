"""FineViT parallel parity: TP, TP+SP, CP and PP runs of the encoder with all three heads must give
the single-rank run's outputs, loss, gradients and updated weights.

Same structure as ``gpt_parity``: a 1-rank oracle world saves its initial weights with megatron
``dist_checkpointing`` and returns its outputs, gradients and post-step weights; every parallel
layout loads those weights (megatron reshards them) and is compared shard by shard
(``gpt_parity.oracle_shard``). The model is a tiny FineViT whose last stage carries the MIM head
(with the mask token on the first stage), the MAP head and the merge projector; the loss is a sum
of regressions on all three, so every parameter gets a gradient. Micro-batches are packs of
mixed-size images with a padding tail; under CP=4 the images are also padded per segment.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule

from megatron_finevit.config.vit import tiny_vit
from megatron_finevit.models.heads import MAPHead, MergeProjector, MIMHead
from megatron_finevit.models.vit import FineViTModel, pack_images, prepare_encoder_input
from megatron_finevit.testing.gpt_parity import (
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    step_diffs,
    train_step,
)
from megatron_finevit.testing.multirank import Layout

SEED = 4321
VIT = tiny_vit(num_layers=2)
TEACHER_DIM, TEXT_DIM, LLM_DIM = 32, 48, 40
TOTAL_TOKENS = 48  # fixed pack size (pipeline p2p shapes); a multiple of 2·cp·tp for every run
MICROBATCH_IMAGES = [[(56, 84), (28, 56)], [(84, 28), (28, 28), (56, 28)]]  # (H, W) pixels


def build_parity_model(run: Layout):
    """Tiny FineViT + heads for this rank's pipeline stage, wrapped in megatron DDP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = VIT.to_transformer_config(tensor_parallel=run.tp, pipeline_parallel=run.pp,
                                       context_parallel=run.cp,
                                       sequence_parallel=run.sp)
    model = ParityViT(config)
    return DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                   model)


class ParityViT(MegatronModule):
    """The encoder with a mask token; on the last pipeline stage the three heads, returning their
    outputs (and the encoder's real tokens) as a dict."""

    def __init__(self, config):
        super().__init__(config=config)
        self.encoder = FineViTModel(VIT, config, mask_token=True)
        self.model_type = self.encoder.model_type
        self.share_embeddings_and_output_weights = False
        self.pre_process = self.encoder.pre_process
        self.post_process = self.encoder.post_process
        if self.post_process:
            self.mim = MIMHead(config, TEACHER_DIM)
            self.map = MAPHead(config, TEXT_DIM)
            self.projector = MergeProjector(config, LLM_DIM)

    def set_input_tensor(self, input_tensor):
        self.encoder.set_input_tensor(input_tensor)

    def forward(self, inp, masked):
        hidden = self.encoder(**inp.model_inputs(), masked=masked)
        if not self.post_process:
            return hidden
        real = inp.gather_output(hidden, parallel_state.get_context_parallel_group())
        images = inp.cu_seqlens[:inp.grids.shape[0] + 1]
        return {"hidden": real, "mim": self.mim(real), "map": self.map(real, images),
                "proj": self.projector(real, images)}


@dataclass
class Microbatch:
    inp: object  # EncoderInput
    masked: torch.Tensor  # bool [t] in the layout
    mim_mask: torch.Tensor  # bool [N] in pack order
    targets: dict


def microbatches(run: Layout, cp_rank: int) -> list[Microbatch]:
    """The fixed micro-batches (images, masks, regression targets) in this rank's layout."""
    from megatron_finevit.data.masking import random_patch_mask

    g = torch.Generator().manual_seed(SEED)
    out = []
    for sizes in MICROBATCH_IMAGES:
        packed = pack_images([torch.randn(3, h, w, generator=g) for h, w in sizes])
        inp = prepare_encoder_input(packed, run.cp, cp_rank,
                                    sp_size=run.tp if run.sp else 1,
                                    total_tokens=TOTAL_TOKENS)
        mask = random_patch_mask(packed.image_lengths, 0.5, generator=g)
        n_tokens, n_images = len(mask), packed.num_images
        targets = {"mim": torch.randn(n_tokens, TEACHER_DIM, generator=g),
                   "map": torch.randn(n_images, TEXT_DIM, generator=g),
                   "proj": torch.randn(n_tokens // 4, LLM_DIM, generator=g)}
        out.append(Microbatch(inp, inp.to_local(mask, fill=False), mask, targets))
    return out


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch.inp, batch.masked)

    def loss_func(out):
        mim = ((out["mim"] - batch.targets["mim"]) ** 2).mean(-1)[batch.mim_mask].mean()
        loss = (mim + ((out["map"] - batch.targets["map"]) ** 2).mean()
                + ((out["proj"] - batch.targets["proj"]) ** 2).mean())
        loss = loss * batch.inp.cp_loss_scale  # same loss on every CP rank (see gather_output)
        # clone: megatron divides the returned loss by num_microbatches in place
        metrics = {name: value.detach().clone() for name, value in out.items()}
        return loss, {"loss": loss.detach() / batch.inp.cp_loss_scale, **metrics}

    return output, loss_func


def _train(run: Layout, model, cp_rank: int):
    """One Adam step (lr 1, eps 1: smooth in the gradient, as gpt_parity) over the micro-batches;
    returns (loss, grad norm, grads, per-micro-batch head outputs on the last stage)."""
    captured = []

    def capturing_step(data_iterator, model):
        output, loss_func = _forward_step(data_iterator, model)

        def wrapped(out):
            loss, metrics = loss_func(out)
            captured.append({k: v for k, v in metrics.items() if k != "loss"})
            return loss, metrics

        return output, wrapped

    optimizer = make_optimizer(model, distributed_optimizer=False, lr=1.0, adam_eps=1.0)
    batches = microbatches(run, cp_rank)
    loss, grad_norm, grads = train_step(model, optimizer, iter(batches), len(batches),
                                        TOTAL_TOKENS, 1, forward_step_func=capturing_step,
                                        loss_key="loss")
    return loss, grad_norm, grads, captured


def _setup(run: Layout):
    from megatron_finevit.platform import init_parallel, set_seed

    init_parallel(run.parallel_config(), num_attention_heads=VIT.num_attention_heads, num_layers=VIT.num_layers)
    set_seed(SEED)


def reference_run(rank: int, world_size: int, ckpt_dir: str) -> dict:
    """The single-rank oracle: saves its initial weights to ``ckpt_dir``; returns loss, grad norm,
    gradients, post-step weights (by parameter name) and the head outputs per micro-batch."""
    assert world_size == 1
    run = Layout()
    _setup(run)
    model = build_parity_model(run)
    save_checkpoint(model.module, ckpt_dir)
    loss, grad_norm, grads, outputs = _train(run, model, 0)
    weights = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    return {"loss": loss, "grad_norm": grad_norm, "grads": grads, "weights": weights,
            "outputs": outputs}


def parallel_run(rank: int, world_size: int, ckpt_dir: str, oracle: dict,
                 runs: list[dict]) -> dict:
    """Every layout in ``runs`` (Layout kwargs) against the oracle: max abs differences of the
    outputs (last stage), loss, gradients and updated weights, per layout label."""
    report = {}
    for kwargs in runs:
        run = replace(Layout(), **kwargs)
        _setup(run)
        model = build_parity_model(run)
        load_checkpoint(model.module, ckpt_dir)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        loss, grad_norm, grads, outputs = _train(
            run, model, parallel_state.get_context_parallel_rank())
        diffs = step_diffs(model.module, loss, grad_norm, grads, oracle, run.tp, tp_rank)
        diffs.update(num_params=len(diffs.pop("params")), num_outputs=0, output=0.0)
        for mine, ref in zip(outputs, oracle["outputs"]):
            for key, value in mine.items():
                diffs["output"] = max(diffs["output"], (value - ref[key]).abs().max().item())
                diffs["num_outputs"] += 1
        report[run.label] = diffs
    return report


# --- single-rank checks (one 1-rank world each for the model and the heads tests) --------------


def _images(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in sizes]


def _encode(model, packed, **layout):
    inp = prepare_encoder_input(packed, **layout)
    return inp.gather_output(model(**inp.model_inputs()))


def model_checks(rank: int, world_size: int) -> dict:
    """The encoder on one rank: packed vs per-image outputs and gradients, layout padding,
    the mask token, and the paper preset's parameters built on the meta device."""
    from megatron_finevit.config.vit import finevit_0p86b

    run = Layout()
    _setup(run)
    vit = tiny_vit()
    model = FineViTModel(vit, vit.to_transformer_config(), mask_token=True)
    sizes = [(56, 84), (28, 28), (84, 56), (28, 112)]
    images = _images(sizes, SEED)
    report = {}

    # packed == each image alone (outputs), and the pack's gradient == the sum of per-image ones
    packed = pack_images(images)
    probe = torch.randn(sum(packed.image_lengths), vit.hidden_size,
                        generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    out = _encode(model, packed)
    (out * probe).sum().backward()
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone = []
    for i, image in enumerate(images):
        a, b = packed.cu_seqlens[i].item(), packed.cu_seqlens[i + 1].item()
        single = _encode(model, pack_images([image]))
        (single * probe[a:b]).sum().backward()
        alone.append(single.detach())
    alone = torch.cat(alone)
    report["packed_vs_alone_output"] = (out.detach() - alone).abs().max().item()
    # relative to each gradient's largest entry: fp32 sums over the pack in another order
    report["packed_vs_alone_grad"] = max(
        ((p.grad - grads_packed[n]).abs().max() / p.grad.abs().max()).item()
        for n, p in model.named_parameters() if p.grad is not None)
    report["num_grads"] = len(grads_packed)
    report["output_scale"] = alone.abs().mean().item()

    with torch.no_grad():
        # a fixed-size pack with a padding tail, and the CP=2 segment layout on one rank
        padded = _encode(model, pack_images(images, pad_to=200), total_tokens=256)
        report["padded_vs_alone_output"] = (padded - alone).abs().max().item()
        # masked patches: their pixels no longer matter, the others' outputs still do
        mask = torch.zeros(len(probe), dtype=torch.bool)
        mask[::3] = True
        inp = prepare_encoder_input(packed)
        noisy = pack_images([img + torch.randn_like(img) for img in images])
        noisy.patches = torch.where(mask[:, None], noisy.patches, packed.patches)
        masked_out = inp.gather_output(model(**inp.model_inputs(), masked=mask))
        inp_noisy = prepare_encoder_input(noisy)
        masked_noisy = inp_noisy.gather_output(model(**inp_noisy.model_inputs(), masked=mask))
        report["mask_ignores_masked_pixels"] = (masked_out - masked_noisy).abs().max().item()
        report["mask_changes_output"] = (masked_out - alone).abs().max().item()
        report["noise_changes_unmasked_output"] = (
            inp_noisy.gather_output(model(**inp_noisy.model_inputs())) - alone).abs().max().item()
    plain = FineViTModel(vit, vit.to_transformer_config())
    try:
        plain(**inp.model_inputs(), masked=mask)
        report["mask_without_token_error"] = ""
    except ValueError as exc:
        report["mask_without_token_error"] = str(exc)

    paper = finevit_0p86b()
    with torch.device("meta"):
        big = FineViTModel(paper, paper.to_transformer_config(perform_initialization=False))
    report["paper_num_parameters"] = sum(p.numel() for p in big.parameters())
    report["paper_shapes"] = {n: list(p.shape) for n, p in big.named_parameters()
                              if not n.startswith("decoder.layers.") or ".layers.0." in n}
    report["paper_num_layers"] = len(big.decoder.layers)
    return report


def head_checks(rank: int, world_size: int) -> dict:
    """The heads on one rank: shapes, per-image isolation, and each head against a by-hand
    computation from its own weights."""
    import math

    from megatron_finevit.models.heads import MAPHead, MergeProjector, MIMHead

    _setup(Layout())
    config = VIT.to_transformer_config()
    h = VIT.hidden_size
    mim, map_head, projector = MIMHead(config, TEACHER_DIM), MAPHead(config, TEXT_DIM), \
        MergeProjector(config, LLM_DIM)
    g = torch.Generator().manual_seed(SEED)
    lengths = [24, 4, 12, 8]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    tokens = torch.randn(sum(lengths), h, generator=g)
    report = {}
    with torch.no_grad():
        outs = {"mim": mim(tokens), "map": map_head(tokens, cu), "proj": projector(tokens, cu)}
        report["shapes"] = {k: list(v.shape) for k, v in outs.items()}

        # change image 1 only: image 0, 2, 3 rows are unchanged, image 1's change
        changed = tokens.clone()
        changed[24:28] += 1.0
        after = {"map": map_head(changed, cu), "proj": projector(changed, cu)}
        others_map = [0, 2, 3]
        others_proj = torch.ones(len(tokens) // 4, dtype=torch.bool)
        others_proj[6] = False  # image 1 = window 6
        report["isolation_map_others"] = (after["map"][others_map] - outs["map"][others_map]).abs().max().item()
        report["isolation_map_changed"] = (after["map"][1] - outs["map"][1]).abs().max().item()
        report["isolation_proj_others"] = (after["proj"][others_proj] - outs["proj"][others_proj]).abs().max().item()
        report["isolation_proj_changed"] = (after["proj"][~others_proj] - outs["proj"][~others_proj]).abs().max().item()

        # by-hand references
        w = dict(map_head.named_parameters())
        heads, d = VIT.num_attention_heads, h // VIT.num_attention_heads
        q = (w["q_proj.weight"] @ w["probe"] + w["q_proj.bias"]).view(heads, d)
        ref_map = []
        for image in tokens.split(lengths):
            kv = (image @ w["kv_proj.weight"].T + w["kv_proj.bias"]).view(-1, heads, 2, d)
            att = torch.softmax(torch.einsum("hd,nhd->hn", q, kv[:, :, 0]) / math.sqrt(d), -1)
            pooled = torch.einsum("hn,nhd->hd", att, kv[:, :, 1]).reshape(h)
            pooled = w["out_proj.weight"] @ pooled + w["out_proj.bias"]
            normed = map_head.norm(pooled)
            mlp = torch.nn.functional.gelu(w["fc1.weight"] @ normed + w["fc1.bias"], approximate="tanh")
            hidden = pooled + w["fc2.weight"] @ mlp + w["fc2.bias"]
            ref_map.append(w["text_proj.weight"] @ hidden + w["text_proj.bias"])
        report["map_vs_reference"] = (outs["map"] - torch.stack(ref_map)).abs().max().item()

        p = dict(projector.named_parameters())
        windows = torch.stack([torch.cat(list(projector.norm(tokens[i:i + 4])))
                               for i in range(0, len(tokens), 4)])
        ref_proj = torch.nn.functional.gelu(windows @ p["fc1.weight"].T + p["fc1.bias"]) \
            @ p["fc2.weight"].T + p["fc2.bias"]
        report["proj_vs_reference"] = (outs["proj"] - ref_proj).abs().max().item()
        m = dict(mim.named_parameters())
        report["mim_vs_reference"] = (outs["mim"] - (tokens @ m["proj.weight"].T + m["proj.bias"])).abs().max().item()
    try:
        projector(tokens[:30], torch.tensor([0, 24, 30], dtype=torch.int32))
        report["projector_error"] = ""
    except ValueError as exc:
        report["projector_error"] = str(exc)
    return report
