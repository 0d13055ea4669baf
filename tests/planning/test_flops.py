"""The FLOP model (``planning.flops``) against an independent count: torch's ``FlopCounterMode``
over a real forward + backward of the megatron FineViT-VL on a packed THD micro-batch, with every
combination of frozen towers (autograd decides which input / weight gradients run, so the
frozen-tower factors are checked too).

The counter has no formula for the CPU SDPA kernel (``_scaled_dot_product_flash_attention_for_cpu``
and its backward): without help it counts no attention on CPU at all (checked below). We give it
torch's own ``sdpa_flop_count`` for those two ops — per call, from the shapes the kernel really
sees (one call per image or sample, GQA heads) — with our conventions: a causal call counts half
the square (torch's GPU formulas count the full one: "we aren't accounting for causal attention")
and the backward is ``dQ, dK, dP, dV`` (torch's formula adds the flash backward's recomputation
of ``QKᵀ``, which model FLOPs leave out). With that the counts agree to rounding.
"""

from __future__ import annotations

import pytest
import torch

from megatron_finevit.config.vit import finevit_0p86b
from megatron_finevit.planning.flops import (
    llm_tower_flops,
    projector_flops,
    transformer_flops,
    vit_tower_flops,
    vlm_flops,
)
from megatron_finevit.planning.selfcheck import cpu_sdpa_formulas
from megatron_finevit.testing.finevit_vl_parity import TRAIN_PACKS, tiny_vl_config
from megatron_finevit.testing.multirank import Layout, run_world

CONFIG = tiny_vl_config()
PACK_BUDGET = 36  # 30 tokens of samples and a padding segment of 6, which the LLM computes too
IMAGE_PATCHES = [(h // 14) * (w // 14) for sizes, _ in TRAIN_PACKS[0] for h, w in sizes]
LLM_LENGTHS = [tokens for _, tokens in TRAIN_PACKS[0]]
LLM_SEGMENTS = LLM_LENGTHS + [PACK_BUDGET - sum(LLM_LENGTHS)]
# (vit, projector, llm) trainable
CASES = {"all": (True, True, True), "llm_frozen": (True, True, False),
         "vit_frozen": (False, True, True), "projector_only": (False, True, False),
         "projector_frozen": (True, False, True), "vit_only": (True, False, False),
         "llm_only": (False, False, True)}


def counted_world(rank: int, world_size: int) -> dict:
    """FLOPs the counter sees in one forward + backward of the tiny FineViT-VL on a packed
    micro-batch, per case of ``CASES`` (frozen towers: ``requires_grad=False``), and once for
    ``all`` without the CPU SDPA formulas (``all_plain``)."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_finevit.testing.finevit_vl_parity import (
        build_model,
        packed_batch,
        vl_sample,
    )

    model = build_model(CONFIG, Layout())
    generator = torch.Generator().manual_seed(0)
    samples = [vl_sample(CONFIG, sizes, tokens, generator) for sizes, tokens in TRAIN_PACKS[0]]
    batch = packed_batch(CONFIG, samples, PACK_BUDGET)
    modules = (model.encoder, model.projector, model.llm)

    def count(custom_mapping: dict, **masked) -> int:
        model.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False, custom_mapping=custom_mapping) as counter:
            losses = model(batch["images"], batch["ids"], batch["positions"],
                           labels=batch["labels"], packed_seq_params=batch["params"], **masked)
            (losses * batch["loss_mask"]).sum().backward()
        return counter.get_total_flops()

    counts = {}
    for name, trainable in CASES.items():
        for module, trains in zip(modules, trainable):
            module.requires_grad_(trains)
        counts[name] = count(cpu_sdpa_formulas())
    model.requires_grad_(True)
    counts["all_plain"] = count({})
    # as training runs it: the output layer on the supervised rows only (models/llm/masked_output)
    counts["all_masked"] = count(cpu_sdpa_formulas(), output_mask=batch["loss_mask"])
    counts["supervised_rows"] = int((batch["loss_mask"] != 0).sum())
    return counts


@pytest.fixture(scope="module")
def counted():
    (counts,) = run_world(counted_world, 1)
    return counts


@pytest.mark.parametrize("case", sorted(CASES))
def test_vlm_flops_equal_the_flop_counter(counted, case):
    vit, projector, llm = CASES[case]
    ours = vlm_flops(CONFIG, IMAGE_PATCHES, LLM_SEGMENTS, vit_trainable=vit, llm_trainable=llm,
                     projector_trainable=projector)
    assert ours == pytest.approx(counted[case], rel=1e-9)


def test_output_rows_count_the_logits_training_computes(counted):
    # training's forward projects only the supervised rows onto the vocabulary: MFU counts those
    rows = counted["supervised_rows"]
    assert 0 < rows < sum(LLM_SEGMENTS)
    ours = vlm_flops(CONFIG, IMAGE_PATCHES, LLM_SEGMENTS, output_rows=rows)
    assert ours == pytest.approx(counted["all_masked"], rel=1e-9)
    assert ours < vlm_flops(CONFIG, IMAGE_PATCHES, LLM_SEGMENTS)


def test_the_counter_alone_misses_cpu_attention(counted):
    # why the test gives the counter its SDPA formulas: without them it sees only the linears
    ours = vlm_flops(CONFIG, IMAGE_PATCHES, LLM_SEGMENTS)
    assert counted["all_plain"] < 0.97 * ours


def test_frozen_towers_cost_what_their_position_needs():
    vit = vit_tower_flops(CONFIG.vit, IMAGE_PATCHES)
    projector = projector_flops(CONFIG, IMAGE_PATCHES)
    llm = llm_tower_flops(CONFIG.llm, LLM_LENGTHS)
    full = vlm_flops(CONFIG, IMAGE_PATCHES, LLM_LENGTHS)
    assert full == pytest.approx(3 * (vit.forward + projector.forward + llm.forward)
                                 - vit.input_weights)  # no gradient into the pixels
    nothing = vlm_flops(CONFIG, IMAGE_PATCHES, LLM_LENGTHS, vit_trainable=False,
                        llm_trainable=False, projector_trainable=False)
    assert nothing == pytest.approx(vit.forward + projector.forward + llm.forward)
    # a frozen ViT with nothing before it: forward only
    vit_frozen = vlm_flops(CONFIG, IMAGE_PATCHES, LLM_LENGTHS, vit_trainable=False)
    assert full - vit_frozen == pytest.approx(2 * vit.forward - vit.input_weights)
    # a frozen LLM behind a trained projector: 2x its linears, 3x its attention scores
    llm_frozen = vlm_flops(CONFIG, IMAGE_PATCHES, LLM_LENGTHS, llm_trainable=False)
    assert full - llm_frozen == pytest.approx(llm.weights)
    assert llm_frozen - nothing > 2 * llm.forward - llm.scores


def test_transformer_flops_unchanged_for_the_vision_stages():
    from megatron_finevit.training.stages import contrastive, vision

    assert vision.transformer_flops is transformer_flops is contrastive.transformer_flops
    # 3 x (2 · params · tokens + 4 · n² · h · layers per sequence)
    assert transformer_flops(1000, [3, 5], 2, 8) == 3.0 * (2 * 1000 * 8 + 4 * (9 + 25) * 8 * 2)


def test_stage_count_and_vlm_count_agree_on_the_paper_encoder():
    # Stages I/II count the encoder as 6 · params · tokens (+ attention); the per-module count
    # differs only by norms (not matmuls) and the patch embedding's missing input gradient.
    vit = finevit_0p86b()
    patches = [1024, 576, 2304]
    per_module = vit_tower_flops(vit, patches).forward_backward(True, grad_into=False)
    stage = transformer_flops(vit.num_parameters(), patches, vit.num_layers, vit.hidden_size)
    assert per_module == pytest.approx(stage, rel=1e-3)
