"""Probes for the megatron-core CPU compatibility layer: for each shim, the smallest call into the
megatron-core code it answers. ``shim_necessity_world`` removes each shim in turn and records that
its probe fails, then puts it back and records that the probe passes."""

from __future__ import annotations

import torch


def _tiny_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=True,
                  pipeline_dtype=torch.float32, params_dtype=torch.float32,
                  gradient_accumulation_fusion=False)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _ddp_linear():
    """A megatron-DDP-wrapped column-parallel linear with a gradient in its buffer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear

    config = _tiny_config()
    layer = ColumnParallelLinear(8, 8, config=config, init_method=torch.nn.init.normal_,
                                 bias=False, gather_output=True)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), layer)
    out, _ = model(torch.ones(2, 8))
    out.sum().backward()
    return model


def probe_current_device_is_cpu():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    return RotaryEmbedding(kv_channels=8, rotary_percent=1.0)(4).shape


def probe_cuda_sync_is_noop():
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    comm = P2PCommunicator(parallel_state.get_pipeline_model_parallel_group(), _tiny_config())
    if parallel_state.is_pipeline_first_stage():
        comm.send_forward(torch.ones(2, 1, 8), is_last_stage=False)
        return "sent"
    return comm.recv_forward((2, 1, 8), is_first_stage=False).sum().item()


def probe_cuda_streams_are_null():
    model = _ddp_linear()
    model.finish_grad_sync()  # start_grad_sync asks torch.cuda.current_stream()
    return model.module.weight.main_grad.abs().sum().item()


def probe_cpu_rng_tracker():
    from megatron.core.tensor_parallel.random import (
        get_cuda_rng_tracker,
        model_parallel_cuda_manual_seed,
    )

    model_parallel_cuda_manual_seed(123, force_reset_rng=True)
    with get_cuda_rng_tracker().fork():
        return torch.rand(2).tolist()


def probe_cpu_causal_mask():
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func

    softmax = FusedScaleMaskSoftmax(
        input_in_fp16=False, input_in_bf16=False, attn_mask_type=AttnMaskType.causal,
        scaled_masked_softmax_fusion=False, mask_func=attention_mask_func, softmax_in_fp32=True,
        scale=None)
    probs = softmax(torch.zeros(1, 1, 3, 3), None)
    return probs[0, 0].tolist()


def probe_cuda_literal_devices():
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3), [_ddp_linear()])
    return type(optimizer).__name__


def probe_cuda_type_name_checks():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.full((4,), 2.0)
    clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=4.0)
    return param.grad.tolist()


PROBES = {
    "current_device_is_cpu": probe_current_device_is_cpu,
    "cuda_sync_is_noop": probe_cuda_sync_is_noop,
    "cuda_streams_are_null": probe_cuda_streams_are_null,
    "cpu_rng_tracker": probe_cpu_rng_tracker,
    "cpu_causal_mask": probe_cpu_causal_mask,
    "cuda_literal_devices": probe_cuda_literal_devices,
    "cuda_type_name_checks": probe_cuda_type_name_checks,
}


def shim_necessity_world(rank: int, world_size: int) -> dict:
    """For every shim: {'without': error text or None, 'with': probe result or error text}."""
    from megatron_finevit.platform import ParallelConfig, init_parallel
    from megatron_finevit.platform.megatron_cpu_compat import without_shim

    report = {}
    for name, probe in PROBES.items():
        # The p2p probe needs two pipeline stages; the others run on plain data parallelism.
        init_parallel(ParallelConfig(pipeline_parallel=2 if name == "cuda_sync_is_noop" else 1))
        entry = {}
        with without_shim(name):
            try:
                probe()
                entry["without"] = None
            except Exception as exc:  # noqa: BLE001 - the failure is what we record
                entry["without"] = f"{type(exc).__name__}: {exc}"
        init_parallel(ParallelConfig(pipeline_parallel=2 if name == "cuda_sync_is_noop" else 1))
        try:
            entry["with"] = probe()
            entry["ok"] = True
        except Exception as exc:  # noqa: BLE001
            entry["with"] = f"{type(exc).__name__}: {exc}"
            entry["ok"] = False
        report[name] = entry
    return report
