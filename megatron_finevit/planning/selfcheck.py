"""The planner against measurements on built models (``tools/plan.py --self-check``).

FLOPs: the forward of the per-module counts (``planning.flops``) against
``torch.utils.flop_counter.FlopCounterMode`` over a real forward of the tiny megatron ViT (a pack of
mixed-size images), SigLIP2 text tower, Qwen3 (a THD pack of unequal samples) and FineViT-VL.
The counter has no formula for CPU SDPA (``_scaled_dot_product_flash_attention_for_cpu``); it is
given torch's ``sdpa_flop_count`` per call with our conventions (a causal call counts half the
square, see ``planning/flops.py``), as in ``tests/planning/test_flops.py``.

Activations: one layer's bytes held for backward, measured with
``torch.autograd.graph.saved_tensors_hooks`` as the difference between a 2-layer and a 1-layer
tower on the same input (so embeddings, heads and the shared RoPE table cancel), counting each
storage once and no parameter, against ``planning.memory.layer_activation_bytes`` at the local
spec. Measured in fp32: on CPU megatron's bf16 path keeps its norms in fp32 (a CPU-only
artefact), so fp32 is the dtype whose bytes are one number per value, as on the GPU's bf16 path.
"""

from __future__ import annotations

import torch

IMAGE_SIZES = [(56, 84), (28, 28), (84, 56), (28, 112)]  # (H, W) pixels: 24, 4, 24, 16 patches
LLM_SEGMENTS = [11, 5, 16]                                # tokens per packed sample
TEXT_ROWS, TEXT_CONTEXT = 3, 16


def cpu_sdpa_formulas() -> dict:
    """``FlopCounterMode`` custom mapping for the CPU SDPA kernel and its backward."""
    from torch.utils.flop_counter import sdpa_flop_count

    aten = torch.ops.aten

    def forward(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None,
                **kwargs):
        return sdpa_flop_count(query, key, value) // (2 if is_causal else 1)

    def backward(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False,
                 *args, out_shape=None, **kwargs):
        return 2 * sdpa_flop_count(query, key, value) // (2 if is_causal else 1)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def counted_forward(run) -> int:
    """FLOPs the counter sees in ``run()`` (no grad)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False,
                                          custom_mapping=cpu_sdpa_formulas()) as counter:
        run()
    return counter.get_total_flops()


def saved_bytes(run, module: torch.nn.Module) -> int:
    """Bytes of the distinct storages autograd keeps for backward in ``run()``, parameters of
    ``module`` excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in params:
            storages[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


# --- the towers, built on this rank ---------------------------------------------------------------


def _vit(layers: int):
    from megatron_finevit.config.vit import tiny_vit
    from megatron_finevit.models.vit import FineViTModel, pack_images, prepare_encoder_input

    vit = tiny_vit(num_layers=layers)
    model = FineViTModel(vit, vit.to_transformer_config())
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(3, h, w, generator=generator) for h, w in IMAGE_SIZES]
    inputs = prepare_encoder_input(pack_images(images)).model_inputs()
    return vit, model, lambda: model(**inputs)


def _text(layers: int):
    from megatron_finevit.config.text import tiny_text
    from megatron_finevit.models.text_tower import build_text_tower

    text = tiny_text(num_layers=layers)
    tower = build_text_tower(text, text.to_transformer_config())
    ids = torch.randint(3, text.vocab_size, (TEXT_ROWS, TEXT_CONTEXT),
                        generator=torch.Generator().manual_seed(0))
    return text, tower, lambda: tower(ids)


def _qwen3(layers: int):
    from dataclasses import replace

    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_finevit.models.llm import build_qwen3
    from megatron_finevit.testing.finevit_vl_parity import tiny_vl_config

    llm = replace(tiny_vl_config().llm, num_layers=layers)
    model = build_qwen3(llm, llm.to_transformer_config())
    lengths = torch.tensor(LLM_SEGMENTS)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=int(lengths.max()), max_seqlen_kv=int(lengths.max()))
    ids = torch.randint(0, llm.vocab_size, (1, int(cu[-1])),
                        generator=torch.Generator().manual_seed(0))
    return llm, model, lambda: model(ids, None, None, packed_seq_params=params)


def _vlm():
    from megatron_finevit.testing.finevit_vl_parity import (
        TRAIN_PACKS,
        packed_batch,
        tiny_vl_config,
        vl_sample,
    )
    from megatron_finevit.models.vlm import FineViTVLModel

    config = tiny_vl_config()
    model = FineViTVLModel(config, *config.to_transformer_configs())
    generator = torch.Generator().manual_seed(0)
    samples = [vl_sample(config, sizes, tokens, generator) for sizes, tokens in TRAIN_PACKS[0]]
    budget = sum(tokens for _, tokens in TRAIN_PACKS[0])  # no padding segment
    batch = packed_batch(config, samples, budget)
    patches = [(h // 14) * (w // 14) for sizes, _ in TRAIN_PACKS[0] for h, w in sizes]
    lengths = [tokens for _, tokens in TRAIN_PACKS[0]]
    return config, patches, lengths, lambda: model(batch["images"], batch["ids"],
                                                   batch["positions"],
                                                   packed_seq_params=batch["params"])


# --- the checks ---------------------------------------------------------------------------------


def flop_checks() -> dict[str, tuple[float, int]]:
    """``{model: (planner forward FLOPs, counted forward FLOPs)}``."""
    from megatron_finevit.planning import flops

    vit, _, run_vit = _vit(4)
    patches = [(h // 14) * (w // 14) for h, w in IMAGE_SIZES]
    text, _, run_text = _text(2)
    llm, _, run_llm = _qwen3(4)
    vl, vl_patches, vl_lengths, run_vl = _vlm()
    vl_planned = (flops.vit_tower_flops(vl.vit, vl_patches).forward
                  + flops.projector_flops(vl, vl_patches).forward
                  + flops.llm_tower_flops(vl.llm, vl_lengths).forward)
    return {
        "vit": (flops.vit_tower_flops(vit, patches).forward, counted_forward(run_vit)),
        "text_tower": (flops.text_tower_flops(text, TEXT_ROWS, TEXT_CONTEXT).forward,
                       counted_forward(run_text)),
        "qwen3": (flops.llm_tower_flops(llm, LLM_SEGMENTS).forward, counted_forward(run_llm)),
        "finevit_vl": (vl_planned, counted_forward(run_vl)),
    }


def activation_checks() -> dict[str, tuple[float, int]]:
    """``{tower: (planned, measured)}`` bytes of one layer at fp32 over the check's input."""
    from megatron_finevit.planning.memory import LayerShape, layer_activation_bytes

    results = {}
    for name, build, tokens in (("vit", _vit, sum((h // 14) * (w // 14) for h, w in IMAGE_SIZES)),
                                ("text_tower", _text, TEXT_ROWS * TEXT_CONTEXT),
                                ("qwen3", _qwen3, sum(LLM_SEGMENTS))):
        measured = []
        for layers in (1, 2):
            config, model, run = build(layers)
            measured.append(saved_bytes(run, model))
        planned = layer_activation_bytes(LayerShape.of(config), tokens, bytes_per_value=4)
        results[name] = (planned, measured[1] - measured[0])
    return results


def selfcheck_world(rank: int, world_size: int) -> dict:
    """Both checks on one gloo rank (megatron's groups need a process group)."""
    from megatron_finevit.platform import ParallelConfig, init_parallel, set_seed

    init_parallel(ParallelConfig(), num_attention_heads=4, num_layers=4)
    set_seed(0)
    return {"flops": flop_checks(), "activations": activation_checks()}


def relative_error(pairs: dict[str, tuple[float, float]]) -> float:
    return max(abs(planned - measured) / measured for planned, measured in pairs.values())


def run_selfcheck() -> dict:
    """``{"flops": ..., "activations": ...}`` measured in a spawned 1-rank world."""
    from megatron_finevit.testing.multirank import run_world

    (result,) = run_world(selfcheck_world, 1)
    return result
