"""Logits only where the loss is (``models/llm/masked_output``): on a packed multimodal
micro-batch, FineViT-VL's per-token loss with ``loss_mask`` equals megatron's own full-vocabulary
loss (``labels`` alone) at every supervised position, is 0 elsewhere, and the gradients of the
masked loss sum equal, for every parameter — at one rank and at TP2 + SP, where the hidden states
are gathered from the sequence-parallel split (megatron's full path being the oracle there)."""

from __future__ import annotations

import pytest
import torch

from megatron_finevit.testing.multirank import Layout, run_world


def compare_world(rank, world_size, layout):
    from megatron_finevit.testing.finevit_vl_parity import (
        build_model,
        packed_train_microbatches,
        tiny_vl_config,
    )

    config = tiny_vl_config()
    model = build_model(config, layout)
    params = list(model.parameters())
    batch = packed_train_microbatches(config)[1]
    mask = batch["loss_mask"]
    results = []
    for loss_mask in (None, mask):
        per_token = model(batch["images"], batch["ids"], batch["positions"],
                          labels=batch["labels"], packed_seq_params=batch.get("params"),
                          output_mask=loss_mask)
        grads = torch.autograd.grad((per_token * mask).sum(), params)
        results.append((per_token.detach(), [g.detach() for g in grads]))
    (full, full_grads), (masked, masked_grads) = results
    return {"supervised": int((mask > 0).sum()), "positions": mask.numel(),
            "loss_diff": ((full - masked) * mask).abs().max().item(),
            "loss_scale": (full * mask).abs().max().item(),
            "unsupervised_zero": bool((masked[mask == 0] == 0).all()),
            "grad_diff": max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
                             for a, b in zip(full_grads, masked_grads))}


@pytest.mark.parametrize("layout, world_size", [(Layout(), 1), (Layout(tp=2, sp=True), 2)],
                         ids=["single", "tp2_sp"])
def test_masked_output_equals_full_vocabulary_loss(layout, world_size):
    for result in run_world(compare_world, world_size, args=(layout,)):
        assert 0 < result["supervised"] < result["positions"]  # something is skipped
        assert result["loss_diff"] <= 1e-6 * result["loss_scale"]
        assert result["unsupervised_zero"]
        assert result["grad_diff"] <= 1e-5
