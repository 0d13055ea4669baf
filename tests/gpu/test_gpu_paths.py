"""The CUDA paths that CI (CPU only) cannot run, checked on one GPU; skipped without CUDA.

- ``varlen_attn`` (flash, bf16) against the per-block SDPA path in fp32 on the same inputs:
  bidirectional, causal with fewer queries than keys (bottom-right), grouped-query heads, a block
  without keys and a key layout with gaps — outputs and the gradients of q, k and v;
- FineViT on CUDA: bf16 (megatron's bf16 parameters, NCCL world of one) against fp32 with the
  same weights, and a bf16 pack against each image alone;
- the trainer on CUDA in bf16 (toy LM through megatron DDP + distributed optimizer): the loss
  falls, a checkpoint saved on the GPU resumes to the uninterrupted run's losses.

Run on a GPU machine: ``python -m pytest -q tests/gpu`` (README, "GPU paths").
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16_TOL = 2e-2  # relative to the reference's scale


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


@pytest.fixture(scope="module")
def megatron_world():
    """torch.distributed (NCCL, one rank) and megatron's TP = PP = 1 groups."""
    import os

    from megatron_finevit.platform import ParallelConfig, init_distributed, init_parallel, set_seed

    os.environ.setdefault("MASTER_PORT", "29611")
    init_distributed()
    init_parallel(ParallelConfig())
    set_seed(0)  # megatron's CUDA RNG tracker initialises weights on the GPU
    yield


@pytest.mark.parametrize("case", ["bidirectional", "causal_bottom_right", "gqa", "gaps"])
def test_varlen_matches_per_block_sdpa(case):
    from megatron_finevit.models.attention.kernels import (
        AttentionBlocks,
        _sdpa_blocks,
        _use_varlen,
        _varlen_blocks,
    )

    g = torch.Generator(device="cuda").manual_seed(0)
    heads, groups, dim = (8, 2, 64) if case == "gqa" else (8, 8, 64)
    q_lengths = (37, 128, 5, 64)
    if case == "causal_bottom_right":
        blocks = AttentionBlocks(q_lengths, (0, 50, 200, 300), (50, 150, 5, 100), causal=True)
    elif case == "gaps":  # keys shared and skipped, one block without keys
        blocks = AttentionBlocks(q_lengths, (0, 10, 0, 240), (40, 200, 0, 64), causal=False)
    else:
        blocks = AttentionBlocks(q_lengths, (0, 37, 165, 170), q_lengths, causal=False)
    t_k = max(s + n for s, n in zip(blocks.k_starts, blocks.k_lengths))
    q = torch.randn(sum(q_lengths), heads, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(t_k, groups, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(t_k, groups, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    assert _use_varlen(q, 0.0), "varlen_attn unavailable: the CUDA path would not be taken"
    grad = torch.randn_like(q)
    results = []
    for fn, dtype in ((_varlen_blocks, torch.bfloat16), (_sdpa_blocks, torch.float32)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        args = (*leaves, blocks, dim ** -0.5) + ((0.0,) if fn is _sdpa_blocks else ())
        out = fn(*args)
        out.backward(grad.to(dtype))
        results.append([out.detach()] + [t.grad for t in leaves])
    for name, mine, ref in zip(("out", "dq", "dk", "dv"), *results):
        assert _rel(mine, ref) < BF16_TOL, (case, name, _rel(mine, ref))


def _tiny_vit_on_gpu(dtype):
    from megatron_finevit.config.vit import small_vit
    from megatron_finevit.models.vit import FineViTModel

    torch.manual_seed(0)
    vit = small_vit(num_layers=2)
    return vit, FineViTModel(vit, vit.to_transformer_config(params_dtype=dtype)).cuda()


def _encode(model, images):
    from megatron_finevit.models.vit import pack_images, prepare_encoder_input

    inp = prepare_encoder_input(pack_images(images))
    inp.patches = inp.patches.cuda().to(next(model.parameters()).dtype)
    return inp.gather_output(model(**inp.model_inputs()))


def test_finevit_bf16_matches_fp32_and_packs_exactly(megatron_world):
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, h, w, generator=g) for h, w in ((224, 224), (112, 336), (56, 84))]
    _, fp32 = _tiny_vit_on_gpu(torch.float32)
    _, bf16 = _tiny_vit_on_gpu(torch.bfloat16)
    bf16.load_state_dict({k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point()
                          else v for k, v in fp32.state_dict().items()})
    with torch.no_grad():
        reference, packed = _encode(fp32, images), _encode(bf16, images)
        alone = torch.cat([_encode(bf16, [image]) for image in images])
    assert packed.dtype == torch.bfloat16 and packed.is_cuda
    assert _rel(packed, reference) < BF16_TOL
    assert _rel(packed, alone) < 1e-2  # packing changes nothing beyond bf16 rounding


def test_trainer_bf16_on_gpu_resumes_exactly(megatron_world, tmp_path):
    from megatron_finevit.config.train import TrainConfig
    from megatron_finevit.training.trainer import Trainer

    def config(ckpt=None, signal_at_step=None):
        cfg = TrainConfig(stage="toy_lm", train_steps=12, global_batch_size=4, precision="bf16",
                          stage_config={"num_layers": 2, "signal_at_step": signal_at_step})
        cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, 2
        cfg.eval.at_start = cfg.eval.at_end = False
        cfg.logging.log_interval, cfg.logging.progress_bar = 100, False
        cfg.checkpoint.dir = str(ckpt) if ckpt else None
        return cfg

    uninterrupted = Trainer(config()).train()["losses"]
    assert sum(uninterrupted[-3:]) < 0.8 * sum(uninterrupted[:3])
    first = Trainer(config(tmp_path, signal_at_step=5)).train()
    assert first["stopped_by_signal"]
    second = Trainer(config(tmp_path)).train()
    assert first["losses"] + second["losses"] == uninterrupted
