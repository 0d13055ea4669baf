"""Optimiser (megatron's AdamW, distributed or not) and the LR schedule (warm-up + cosine)."""

from __future__ import annotations

from megatron_finevit.config.train import TrainConfig


def build_optimizer(cfg: TrainConfig, model_chunks, bf16: bool, overrides: dict | None = None):
    """megatron AdamW over the parameters of ``model_chunks`` (DDP-wrapped); ``overrides`` is
    megatron's ``{ParamKey: ParamGroupOverride}`` for parameters that need their own groups."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import get_megatron_optimizer

    from megatron_finevit.platform.megatron_cpu_compat import apply_torch_adam_fixes

    apply_torch_adam_fixes()  # megatron's torch-Adam fallback cannot reload its state otherwise
    for chunk in model_chunks:
        chunk.config.finalize_model_grads_func = finalize_model_grads
        chunk.config.no_sync_func = chunk.no_sync
    return get_megatron_optimizer(optimizer_config(cfg, bf16), model_chunks,
                                  config_overrides=overrides or None)


def optimizer_config(cfg: TrainConfig, bf16: bool):
    """megatron's OptimizerConfig for this run (also the source of the DeepSpeed engine's
    AdamW settings and parameter groups, so both engines optimise the same way)."""
    from megatron.core.optimizer import OptimizerConfig

    o = cfg.optim
    return OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        bf16=bf16, fp16=False,
    )


def build_scheduler(cfg: TrainConfig, optimizer):
    """Linear warm-up to ``lr`` over ``warmup_steps``, then ``decay_style`` down to ``min_lr`` at
    ``train_steps`` (megatron's OptimizerParamScheduler, stepped once per optimiser step)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(cfg.train_steps, 1),
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(cfg.train_steps, 1),
        wd_incr_style="constant",
    )


def megatron_param_groups(cfg: TrainConfig, modules: list, overrides: dict | None = None) -> list[dict]:
    """The parameter groups megatron's optimiser builds for ``modules`` (unwrapped or not), for
    an optimiser megatron does not build (the DeepSpeed engine's): the same grouping (no weight
    decay on biases and 1-D parameters unless the stage gives its own overrides) and the keys
    ``OptimizerParamScheduler`` reads (``max_lr``, ``min_lr``, ``lr_mult``, ``wd_mult``)."""
    from megatron.core.optimizer import (
        _get_param_groups,
        check_config_overrides_consistency,
        get_standard_config_overrides,
    )

    config = optimizer_config(cfg, bf16=False)
    overrides = overrides or get_standard_config_overrides(config)
    check_config_overrides_consistency(config, overrides)
    # Collective (megatron aligns the groups across ranks); groups left empty here are dropped.
    return [g for g in _get_param_groups(list(modules), config, overrides) if g["params"]]
