"""Optimiser (megatron's AdamW, distributed or not), the LR schedule (warm-up + cosine), and named
parameter groups that survive a checkpoint load.

Named groups. A stage gives some parameters their own optimiser group (a tower frozen first, a
projector with its own learning rate) through ``named_overrides``: each group carries its name
under ``GROUP_NAME``, and ``groups_named`` finds it again. megatron-core 0.19 pairs saved groups
with live ones at load by the tuple of ``param_group_identifier_keys`` (lr/wd overrides and
structural flags, optimizer.py and distrib_optimizer.py ``load_state_dict``); two groups equal in
those keys collapse into one saved group, and both live groups take its settings (a Stage II
resume before the text tower's unfreeze froze the whole model that way). So the name joins
megatron's identifier keys (``register_group_name``), ``build_optimizer`` refuses groups megatron
could not tell apart, and ``check_groups_after_load`` compares every group with the fresh build.
"""

from __future__ import annotations

from megatron_finevit.config.train import TrainConfig

GROUP_NAME = "param_group_name"  # param-group key: the stage's name for the group (None: default)


def register_group_name() -> None:
    """Make ``GROUP_NAME`` one of the keys megatron pairs saved and live param groups by.

    megatron reads the module-level tuple ``param_group_identifier_keys`` at load time in
    optimizer.py (``_filter_and_reorder_param_groups``) and in distrib_optimizer.py (imported by
    name, so both bindings are set); its own comment there names adding the distinguishing key as
    the fix for colliding groups. Idempotent."""
    from megatron.core.optimizer import distrib_optimizer, optimizer

    for module in (optimizer, distrib_optimizer):
        if GROUP_NAME not in module.param_group_identifier_keys:
            module.param_group_identifier_keys = (*module.param_group_identifier_keys, GROUP_NAME)


def build_optimizer(cfg: TrainConfig, model_chunks, bf16: bool, overrides: dict | None = None):
    """megatron AdamW over the parameters of ``model_chunks`` (DDP-wrapped); ``overrides`` is
    megatron's ``{ParamKey: ParamGroupOverride}`` for parameters that need their own groups
    (``named_overrides``); None or {} gives megatron's standard groups."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import get_megatron_optimizer

    from megatron_finevit.platform.megatron_cpu_compat import (
        RESHARDABLE_SAVE_BUCKET_PADDING,
        apply_torch_adam_fixes,
    )

    apply_torch_adam_fixes()  # megatron's torch-Adam fallback cannot reload its state otherwise
    RESHARDABLE_SAVE_BUCKET_PADDING.apply()  # several DDP buckets would save shifted states
    register_group_name()
    for chunk in model_chunks:
        chunk.config.finalize_model_grads_func = finalize_model_grads
        chunk.config.no_sync_func = chunk.no_sync
    optimizer = get_megatron_optimizer(optimizer_config(cfg, bf16), model_chunks,
                                       config_overrides=overrides or None)
    check_groups_distinguishable(optimizer.param_groups)
    return optimizer


def optimizer_config(cfg: TrainConfig, bf16: bool):
    """megatron's OptimizerConfig for this run (also the source of the DeepSpeed engine's
    AdamW settings and parameter groups, so both engines optimise the same way)."""
    from megatron.core.optimizer import OptimizerConfig

    o = cfg.optim
    return OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        # megatron documents it as the DDP config's value repeated (the trainer passes both)
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        bf16=bf16, fp16=False,
    )


def named_overrides(cfg: TrainConfig, groups: dict) -> dict:
    """megatron's standard overrides (no weight decay on biases and 1-D parameters; here on
    scalars too) plus one named group per entry of ``groups``: ``{name: ParamKey}`` or ``{name:
    (ParamKey, ParamGroupOverride)}`` (e.g. ``{"projector": (ParamKey(name="*.projector.*"),
    {"max_lr": 1e-3})}``). A parameter matched by two names is an error (megatron's
    "Conflicting overrides"); a bias of a named group keeps both its name and ``wd_mult=0``."""
    from megatron.core.optimizer import ParamKey, ParamPredicate, get_standard_config_overrides

    overrides = dict(get_standard_config_overrides(optimizer_config(cfg, bf16=False)))
    # SigLIP's temperature and bias are 0-D: megatron's rule (1-D or *.bias) misses them, and
    # decay would pull them to 0 over a long run (big_vision decays weight matrices only).
    scalars = ParamKey(predicate=ParamPredicate(name="scalar", fn=lambda p: p.dim() == 0))
    overrides[scalars] = {"wd_mult": 0.0}
    for name, entry in groups.items():
        key, extra = entry if isinstance(entry, tuple) else (entry, {})
        overrides[key] = {**extra, GROUP_NAME: name}
    return overrides


def groups_named(optimizer, name: str) -> list[dict]:
    """The param groups of ``optimizer`` (megatron's or the DeepSpeed view) named ``name``."""
    return [g for g in optimizer.param_groups if g.get(GROUP_NAME) == name]


def group_identity(group: dict) -> tuple:
    """What megatron pairs a saved group with a live one by (its identifier keys, ours
    included): ``param_group_identifier_keys`` read as megatron reads them (a missing key and
    None are the same; NeMo's ``pre_`` aliases)."""
    from megatron.core.optimizer import optimizer as megatron_optimizer

    return tuple(group.get(k, group.get(f"pre_{k}"))
                 for k in megatron_optimizer.param_group_identifier_keys)


def check_groups_distinguishable(param_groups: list[dict]) -> None:
    """Refuse param groups that megatron's checkpoint load could not tell apart (they would
    take each other's settings at resume): a stage marks its groups with ``named_overrides``."""
    seen: dict[tuple, int] = {}
    for index, group in enumerate(param_groups):
        identity = group_identity(group)
        if identity in seen:
            raise ValueError(
                f"optimizer param groups {seen[identity]} and {index} are equal in every key "
                f"megatron matches saved groups by ({identity}); a resume would give both the "
                f"same settings. Give each group its own name with optim.named_overrides")
        seen[identity] = index


def group_members(optimizer) -> list[list]:
    """For each of ``optimizer.param_groups`` (in order), the model parameters it updates on
    this rank: with the distributed optimizer the parameters of this rank's shard, else all
    of the group's (megatron's groups hold fp32 main copies, not the model's parameters)."""
    members = []
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(part, "opt_group_ranges"):  # DistributedOptimizer
            members += [list(r["params"]) for r in part.opt_group_ranges]
        elif hasattr(part, "float16_groups"):  # Float16OptimizerWithFloat16Params
            members += [a + b for a, b in zip(part.float16_groups, part.fp32_from_fp32_groups)]
        else:  # FP32Optimizer: the groups hold the model parameters themselves
            members += [list(g["params"]) for g in part.param_groups]
    return members


def group_settings(optimizer, model) -> list[dict]:
    """Per param group: its name, ``lr``, ``weight_decay``, the keys megatron's scheduler reads
    (``max_lr``, ``min_lr``, ``lr_mult``, ``wd_mult``) and ``members`` (sorted names in
    ``model``) — what must agree between a resumed run and a fresh one."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [{"name": g.get(GROUP_NAME), "lr": g["lr"], "weight_decay": g["weight_decay"],
             **{k: g.get(k) for k in ("max_lr", "min_lr", "lr_mult", "wd_mult")},
             "members": sorted(names[id(p)] for p in params)}
            for g, params in zip(optimizer.param_groups, group_members(optimizer))]


def check_groups_after_load(fresh: list[dict], loaded: list[dict]) -> None:
    """Raise unless each loaded group (``group_settings``) has the fresh build's name, members
    and scheduler keys (``lr`` and ``weight_decay`` follow from those once the scheduler is
    loaded)."""
    static = ("name", "members", "max_lr", "min_lr", "lr_mult", "wd_mult")
    problems = [f"group {i}: {k} {after[k]!r} after the load, {before[k]!r} in a fresh build"
                for i, (before, after) in enumerate(zip(fresh, loaded))
                for k in static if before[k] != after[k]]
    if len(fresh) != len(loaded) or problems:
        raise RuntimeError("optimizer param groups do not match a fresh build after the "
                           f"checkpoint load ({len(loaded)} vs {len(fresh)} groups): "
                           + "; ".join(problems))


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
