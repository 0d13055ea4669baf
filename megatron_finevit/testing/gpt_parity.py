"""Proof that megatron-core trains correctly here: a tiny Qwen3-like GPT (local spec, RMSNorm,
SwiGLU, GQA, qk-layernorm, RoPE) run at TP / TP+SP / PP / DP+distributed optimizer must give the
loss, gradients and updated weights of a single-rank run.

The single-rank oracle runs in its own 1-rank world (``reference_run``): it saves its initial
weights with megatron ``dist_checkpointing`` and returns its loss, gradients and post-step weights.
Every parallel configuration then loads those weights (megatron reshards them for TP and PP) and is
compared, shard by shard, against the matching slice of the oracle (``parallel_run``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

SEED = 1234


@dataclass(frozen=True)
class RunConfig:
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    global_microbatches: int = 8  # split across DP ranks; >= 4 per rank for 1F1B at PP=2
    micro_batch_size: int = 2
    seq_length: int = 16
    vocab_size: int = 128
    num_layers: int = 4
    params_dtype: torch.dtype = torch.float32


def tiny_qwen3(run: RunConfig):
    """The tiny Qwen3-shaped model (GQA 4:2, qk RMSNorm, SwiGLU, RoPE θ = 1e6, untied)."""
    from megatron_finevit.config.llm import Qwen3Config

    return Qwen3Config(num_layers=run.num_layers, hidden_size=64, ffn_hidden_size=96,
                       num_attention_heads=4, num_query_groups=2, head_dim=16,
                       vocab_size=run.vocab_size, max_position_embeddings=run.seq_length,
                       tie_embeddings=False)


def tiny_qwen3_config(run: RunConfig):
    """megatron ``TransformerConfig`` of ``tiny_qwen3`` at ``run``'s TP / PP / SP and dtype."""
    return tiny_qwen3(run).to_transformer_config(run.tp, run.pp,
                                                 sequence_parallel=run.sequence_parallel,
                                                 params_dtype=run.params_dtype)


def build_gpt_module(run: RunConfig, pre_process: bool, post_process: bool):
    """The tiny GPT (this pipeline stage's part), built by the project's Qwen3 factory (local
    spec: sequence-parallel capable norms and our packed core attention)."""
    from megatron_finevit.models.llm import build_qwen3

    return build_qwen3(tiny_qwen3(run), tiny_qwen3_config(run), pre_process=pre_process,
                       post_process=post_process)


def build_gpt(run: RunConfig):
    """The tiny GPT for this rank's pipeline stage, wrapped in megatron DDP."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    model = build_gpt_module(run, parallel_state.is_pipeline_first_stage(),
                             parallel_state.is_pipeline_last_stage())
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=run.distributed_optimizer)
    return DistributedDataParallel(model.config, ddp_config, model)


def global_batch(run: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and next-token labels, each [global_microbatches * micro_batch_size, seq]."""
    g = torch.Generator().manual_seed(SEED)
    n = run.global_microbatches * run.micro_batch_size
    tokens = torch.randint(0, run.vocab_size, (n, run.seq_length + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _microbatches(run: RunConfig, dp_rank: int, dp_size: int):
    """This DP rank's contiguous slice of the global batch, as micro-batches."""
    tokens, labels = global_batch(run)
    per_rank = tokens.shape[0] // dp_size
    lo = dp_rank * per_rank
    for i in range(lo, lo + per_rank, run.micro_batch_size):
        yield tokens[i:i + run.micro_batch_size], labels[i:i + run.micro_batch_size]


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids, None, labels=labels)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        # clone: megatron divides the returned loss by num_microbatches in place
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def make_optimizer(model, distributed_optimizer: bool, lr: float, adam_eps: float = 1e-8,
                   clip_grad: float = 1.0):
    """megatron's Adam (distributed or not) for ``model``, with grad finalisation wired in."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = model.no_sync
    return get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.0, clip_grad=clip_grad,
                        adam_eps=adam_eps, use_distributed_optimizer=distributed_optimizer,
                        bf16=False, fp16=False),
        [model],
    )


def train_step(model, optimizer, data_iterator, num_microbatches: int, seq_length: int,
               micro_batch_size: int, forward_step_func=None, loss_key: str = "lm loss"):
    """Forward/backward over ``num_microbatches`` with megatron's schedule (1F1B when PP > 1),
    then one optimizer step. ``forward_step_func`` defaults to the tiny GPT's; its loss_func must
    report the loss under ``loss_key``. Returns (mean loss on the last stage else None, grad norm,
    {name: main_grad} before the step)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step_func or _forward_step,
        data_iterator=data_iterator,
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    grads = {name: p.main_grad.detach().clone() for name, p in model.module.named_parameters()}
    update_ok, grad_norm, _ = optimizer.step()
    assert update_ok, "optimizer step was skipped"
    loss = torch.stack([x[loss_key] for x in losses]).mean().item() if losses else None
    return loss, grad_norm, grads


def train_one_step(run: RunConfig, model, dp_rank: int, dp_size: int):
    """The parity step: this rank's share of the global batch, one Adam step (grad clip 1.0).
    ``adam_eps=1`` makes the first step ``g / (|g| + 1)``: smooth in the gradient, so parity
    errors are not amplified by Adam's usual sign-like first update."""
    optimizer = make_optimizer(model, run.distributed_optimizer, lr=1.0, adam_eps=1.0)
    return train_step(model, optimizer, _microbatches(run, dp_rank, dp_size),
                      run.global_microbatches // dp_size, run.seq_length, run.micro_batch_size)


# --- the two worlds ----------------------------------------------------------------------------


def global_name(model, name: str) -> str:
    """Local parameter name -> the single-rank model's name (pipeline stages number their layers
    from 0; ``layer_number`` is the global, 1-based index). Any ``...decoder.layers.N`` block."""
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        if parts[i - 1:i + 1] == ["decoder", "layers"]:
            layer = model.get_submodule(".".join(parts[:i + 2]))
            parts[i + 1] = str(layer.layer_number - 1)
    return ".".join(parts)


def oracle_shard(full: torch.Tensor, param: torch.Tensor, name: str, tp: int, tp_rank: int) -> torch.Tensor:
    """The slice of a single-rank tensor that this TP rank's ``param`` holds."""
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = param.partition_dim
    if name.endswith("mlp.linear_fc1.weight"):
        # Gated MLP: each rank holds [gate shard; up shard] (megatron's swiglu layout).
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=dim)[tp_rank]


def load_checkpoint(model, ckpt_dir: str) -> None:
    """Load ``model`` (unwrapped) from a dist_checkpointing directory saved at any layout."""
    from megatron.core import dist_checkpointing

    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))


def save_checkpoint(model, ckpt_dir: str) -> None:
    """Save ``model`` (unwrapped) with dist_checkpointing, as the trainer does."""
    from megatron.core import dist_checkpointing

    os.makedirs(ckpt_dir, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)


def step_diffs(module, loss: float | None, grad_norm: float, grads: dict, oracle: dict,
               tp: int, tp_rank: int, check_grads: bool = True, oracle_name=None) -> dict:
    """One parallel step against the oracle's: ``grad_norm``, ``loss`` (last pipeline stage only:
    ``loss`` None elsewhere) and the max abs difference of this rank's updated weights (and
    ``grads``, by local name) from the oracle's matching TP shards; ``oracle_name(global name) ->
    oracle key`` renames where the single-rank model differs. Returns ``{"grad_norm", ["loss"],
    "weight", "grad", "params": [oracle keys checked]}``."""
    diffs = {"grad_norm": abs(grad_norm - oracle["grad_norm"]), "grad": 0.0, "weight": 0.0,
             "params": []}
    if loss is not None:
        diffs["loss"] = abs(loss - oracle["loss"])
    for name, param in module.named_parameters():
        gname = global_name(module, name)
        gname = oracle_name(gname) if oracle_name else gname
        diffs["params"].append(gname)
        w_ref = oracle_shard(oracle["weights"][gname], param, gname, tp, tp_rank)
        diffs["weight"] = max(diffs["weight"], (param.detach() - w_ref).abs().max().item())
        if check_grads:
            g_ref = oracle_shard(oracle["grads"][gname], param, gname, tp, tp_rank)
            diffs["grad"] = max(diffs["grad"], (grads[name] - g_ref).abs().max().item())
    return diffs


def _setup(run: RunConfig):
    from megatron_finevit.platform import ParallelConfig, init_parallel, set_seed

    init_parallel(ParallelConfig(tensor_parallel=run.tp, pipeline_parallel=run.pp,
                                 sequence_parallel=run.sequence_parallel),
                  num_attention_heads=4, num_query_groups=2, num_layers=run.num_layers)
    set_seed(SEED)


def reference_run(rank: int, world_size: int, ckpt_dir: str) -> dict:
    """The single-rank oracle: saves its initial weights to ``ckpt_dir`` and returns loss, grad
    norm, gradients and post-step weights, all keyed by parameter name."""
    assert world_size == 1
    run = RunConfig()
    _setup(run)
    model = build_gpt(run)
    save_checkpoint(model.module, ckpt_dir)
    loss, grad_norm, grads = train_one_step(run, model, 0, 1)
    weights = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    return {"loss": loss, "grad_norm": grad_norm, "grads": grads, "weights": weights}


def parallel_run(rank: int, world_size: int, ckpt_dir: str, oracle: dict, runs: list[dict],
                 tp2_ckpt_dir: str) -> dict:
    """Every configuration in ``runs`` (RunConfig kwargs) against the oracle; then a TP=2
    dist_checkpointing save loaded at TP=1. Returns max abs differences per configuration."""
    from megatron.core import parallel_state

    report = {}
    for kwargs in runs:
        run = replace(RunConfig(), **kwargs)
        _setup(run)
        model = build_gpt(run)
        load_checkpoint(model.module, ckpt_dir)
        tp, tp_rank = run.tp, parallel_state.get_tensor_model_parallel_rank()
        dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        loss, grad_norm, grads = train_one_step(run, model, dp_rank, dp)
        if loss is not None:  # last pipeline stage: the global-batch loss is the DP average
            loss_t = torch.tensor([loss], dtype=torch.float64)
            torch.distributed.all_reduce(loss_t, group=parallel_state.get_data_parallel_group())
            loss = loss_t.item() / dp
        # with the distributed optimizer main_grad holds only this rank's shard: weights only
        diffs = step_diffs(model.module, loss, grad_norm, grads, oracle, tp, tp_rank,
                           check_grads=not run.distributed_optimizer)
        diffs["num_params"] = len(diffs.pop("params"))
        report[_label(run)] = diffs

    report["checkpoint_tp2_to_tp1"] = _checkpoint_reshard(tp2_ckpt_dir)
    return report


def _label(run: RunConfig) -> str:
    parts = [f"tp{run.tp}", f"pp{run.pp}"]
    if run.sequence_parallel:
        parts.append("sp")
    if run.distributed_optimizer:
        parts.append("distopt")
    return "_".join(parts)


@torch.no_grad()
def _logits(model, run: RunConfig) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    tokens, _ = global_batch(run)
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    model.eval()
    logits = model(tokens, position_ids, None)  # [b, s, vocab / tp]
    return gather_from_tensor_model_parallel_region(logits)


def _checkpoint_reshard(ckpt_dir: str) -> dict:
    """Train a TP=2 model one step, save it, load it into a TP=1 model: same logits."""
    from megatron.core import parallel_state

    run = replace(RunConfig(), tp=2)
    _setup(run)
    model = build_gpt(run)
    train_one_step(run, model, 0, 1)  # move weights away from their initial values
    before = _logits(model.module, run)
    save_checkpoint(model.module, ckpt_dir)
    run1 = RunConfig()
    _setup(run1)
    model1 = build_gpt(run1)
    load_checkpoint(model1.module, ckpt_dir)
    after = _logits(model1.module, run1)
    return {"logits": (before - after).abs().max().item(),
            "dp_size_at_load": parallel_state.get_data_parallel_world_size()}
