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


def _ddp_linear(distributed_optimizer: bool = False):
    """A megatron-DDP-wrapped pair of column-parallel linears with gradients in their buffer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear

    config = _tiny_config()
    torch.manual_seed(0)
    layer = torch.nn.Sequential()  # two parameters, so a shared 'step' tensor would show
    layer.a = ColumnParallelLinear(8, 8, config=config, init_method=torch.nn.init.normal_,
                                   bias=False, gather_output=True)
    layer.b = ColumnParallelLinear(8, 8, config=config, init_method=torch.nn.init.normal_,
                                   bias=False, gather_output=True)
    layer.forward = lambda x: (layer.b(layer.a(x)[0])[0], None)
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer), layer)
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
    return model.module.a.weight.main_grad.abs().sum().item()


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


def probe_torch_adam_step_on_load():
    """Save a distributed torch-Adam state after one step, load it into a fresh optimizer, step
    again: every parameter must be at step 2 (a shared tensor would be at 1 + #params)."""
    import tempfile

    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_finevit.training.checkpointing import _materialise_optimizer_state

    def build():
        model = _ddp_linear(distributed_optimizer=True)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3,
                                                     use_distributed_optimizer=True), [model])
        return model, opt

    metadata = {"distrib_optim_sharding_type": "fully_reshardable",
                "distrib_optim_fully_reshardable_mem_efficient": True}
    model, opt = build()
    opt.step()
    names = [None]
    if dist.get_rank() == 0:
        names[0] = tempfile.mkdtemp(prefix="compat_probe_")
    dist.broadcast_object_list(names)
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    def sharded(m):  # replicated (TP=1) sharded tensors for the two weights
        return make_sharded_tensors_for_checkpoint(m.module.state_dict(keep_vars=True), "")

    model_sd = sharded(model)
    dist_checkpointing.save({"model": model_sd, "optimizer": opt.sharded_state_dict(
        model_sd, metadata=metadata)}, names[0])
    model2, opt2 = build()
    _materialise_optimizer_state(opt2)
    model_sd2 = sharded(model2)
    loaded = dist_checkpointing.load({"optimizer": opt2.sharded_state_dict(
        model_sd2, is_loading=True, metadata=metadata)}, names[0])
    opt2.load_state_dict(loaded["optimizer"])
    _ddp_backward(model2)
    opt2.step()
    inner = opt2.chained_optimizers[0].optimizer
    return sorted({float(state["step"]) for state in inner.state.values()})


def _ddp_backward(model):
    out, _ = model(torch.ones(2, 8))
    out.sum().backward()
    model.finish_grad_sync()


def probe_tied_embedding_sync_on_cpu():
    """Build a tied-embedding Qwen3 split over 2 pipeline stages: the first and last stage
    all-reduce the shared weight while the model is built."""
    from megatron.core import parallel_state

    from megatron_finevit.config.llm import tiny_qwen3
    from megatron_finevit.models.llm import build_qwen3

    config = tiny_qwen3(num_layers=2, vocab_size=1024, tie_embeddings=True)
    model = build_qwen3(config, config.to_transformer_config(pipeline_parallel=2))
    shared = model.shared_embedding_or_output_weight()
    return [parallel_state.get_pipeline_model_parallel_rank(), list(shared.shape)]


def probe_no_cuda_rng_state():
    """megatron's activation checkpoint (what recompute runs): gradient through a recomputed
    forward."""
    from megatron.core import tensor_parallel

    x = torch.arange(3.0, requires_grad=True)
    tensor_parallel.checkpoint(lambda t: (t * t).sum(), False, x).backward()
    return x.grad.tolist()


PROBES = {
    "current_device_is_cpu": probe_current_device_is_cpu,
    "cuda_sync_is_noop": probe_cuda_sync_is_noop,
    "cuda_streams_are_null": probe_cuda_streams_are_null,
    "cpu_rng_tracker": probe_cpu_rng_tracker,
    "cpu_causal_mask": probe_cpu_causal_mask,
    "cuda_literal_devices": probe_cuda_literal_devices,
    "cuda_type_name_checks": probe_cuda_type_name_checks,
    "torch_adam_step_on_load": probe_torch_adam_step_on_load,
    "tied_embedding_sync_on_cpu": probe_tied_embedding_sync_on_cpu,
    "no_cuda_rng_state": probe_no_cuda_rng_state,
}


def shim_necessity_world(rank: int, world_size: int) -> dict:
    """For every shim: {'without': error text or None, 'with': probe result or error text}."""
    from megatron_finevit.platform import ParallelConfig, init_parallel
    from megatron_finevit.platform.megatron_cpu_compat import without_shim

    report = {}
    for name, probe in PROBES.items():
        # The p2p and tied-embedding probes need two pipeline stages; the others run on plain
        # data parallelism.
        pipeline = 2 if name in ("cuda_sync_is_noop", "tied_embedding_sync_on_cpu") else 1
        init_parallel(ParallelConfig(pipeline_parallel=pipeline))
        entry = {}
        with without_shim(name):
            try:
                probe()
                entry["without"] = None
            except Exception as exc:  # noqa: BLE001 - the failure is what we record
                entry["without"] = f"{type(exc).__name__}: {exc}"
        init_parallel(ParallelConfig(pipeline_parallel=pipeline))
        try:
            entry["with"] = probe()
            entry["ok"] = True
        except Exception as exc:  # noqa: BLE001
            entry["with"] = f"{type(exc).__name__}: {exc}"
            entry["ok"] = False
        report[name] = entry
    return report
