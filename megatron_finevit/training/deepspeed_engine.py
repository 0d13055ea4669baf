"""The DeepSpeed ZeRO-2 engine (``engine: deepspeed``): the paper's own setup, data parallel only.

The stage's model (megatron modules, built with TP = PP = CP = 1 — megatron's parallel state is
still initialised so they work) goes to ``deepspeed.initialize`` with a ZeRO stage-2 config:
optimiser states and gradients partitioned over the data-parallel ranks, torch's AdamW on the
parameter groups megatron's optimiser would build, the same gradient clipping, bf16 on GPU / fp32
on CPU, and one gradient-accumulation step per micro-batch of this rank. The LR and weight decay
come from the megatron engine's own ``OptimizerParamScheduler``, driven once per optimiser step,
so both engines follow the same schedule step for step.

Everything else is the megatron engine's (``Trainer``): the loop, metrics averaged over the
data-parallel replicas, non-finite-loss skipping, evaluation, signals and throughput. Checkpoints
are DeepSpeed's own (``deepspeed_checkpointing``), published atomically like ours.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from megatron_finevit.config.train import TrainConfig
from megatron_finevit.training.checkpointing import latest_checkpoint, load_checkpoint
from megatron_finevit.training.deepspeed_checkpointing import (
    is_deepspeed_checkpoint,
    load_deepspeed_checkpoint,
    save_deepspeed_checkpoint,
)
from megatron_finevit.training.optim import build_scheduler, megatron_param_groups
from megatron_finevit.training.trainer import Trainer, build_stage_module

log = logging.getLogger(__name__)


def deepspeed_config(cfg: TrainConfig, microbatches_per_rank: int, bf16: bool) -> dict:
    """The ZeRO-2 config of a run. A DeepSpeed "micro-batch" is one of ours (a packed sequence
    or the stage's fixed batch), so ``train_batch_size`` counts micro-batches too."""
    o = cfg.optim
    return {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": microbatches_per_rank,
        "gradient_clipping": o.clip_grad,
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": False},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        # bf16: accumulate and reduce gradients in fp32, as the megatron engine does
        # (grad_reduce_in_fp32); the fp32 master weights live in ZeRO's partitions.
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32",
        # torch's AdamW (DeepSpeed's fused/CPU Adam would need a C++ build). lr and
        # weight_decay are placeholders: the scheduler sets them per group before every step.
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
            "torch_adam": True, "adam_w_mode": True}},
        "steps_per_print": None,  # the trainer logs
        "wall_clock_breakdown": False,
    }


def _skip_shm_comm_build() -> None:
    """On CPU, DeepSpeed's torch backend JIT-compiles a shared-memory all-reduce op (C++) at
    start-up; training over gloo does not need it. Marking the op incompatible
    is DeepSpeed's own gate for not building it (``deepspeed/comm/torch.py: build_shm_op``)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@contextmanager
def _scalar_parameters_broadcastable():
    """DeepSpeed 0.19.8 broadcasts every parameter from rank 0 at start-up as
    ``p.data.view(torch.uint8)`` (``runtime/engine.py: _broadcast_model``), which fails for 0-dim
    parameters (SigLIP's temperature and bias): show them to that broadcast as 1-element views
    of the same storage. ZeRO builds its partitions later, from the real shapes."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._broadcast_model

    def broadcast_model(engine):
        scalars = [p for p in engine.module.parameters() if p.dim() == 0]
        for param in scalars:
            param.data = param.data.reshape(1)
        try:
            original(engine)
        finally:
            for param in scalars:
                param.data = param.data.reshape(())

    DeepSpeedEngine._broadcast_model = broadcast_model
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model = original


def initialize_zero2(module: torch.nn.Module, param_groups: list[dict], config: dict):
    """``deepspeed.initialize`` without its CPU-only pitfalls; returns the engine."""
    import deepspeed

    if not torch.cuda.is_available():
        _skip_shm_comm_build()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # it logs its whole config
    with _scalar_parameters_broadcastable():
        engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=param_groups,
                                               config=config)
    return engine


class ZeroOptimizerView:
    """What stages see of the optimiser (``Stage.on_step``), as for megatron's: the parameter
    groups (to set a group's LR) and ``reload_model_params`` after editing weights in place."""

    def __init__(self, engine):
        self.engine = engine

    @property
    def param_groups(self) -> list[dict]:
        return self.engine.optimizer.param_groups

    def reload_model_params(self) -> None:
        """Copy the model's (edited) weights into ZeRO's fp32 master partitions."""
        self.engine.optimizer.refresh_fp32_params()


class DeepSpeedTrainer(Trainer):
    """``Trainer`` with the model, optimiser step and checkpoints of DeepSpeed ZeRO-2."""

    def _build_model_and_optimizer(self) -> None:
        module = build_stage_module(self.stage, self.bf16)
        groups = megatron_param_groups(self.cfg, [module], self.stage.optimizer_overrides())
        self.engine = initialize_zero2(
            module, groups, deepspeed_config(self.cfg, self.microbatches_per_rank, self.bf16))
        self.model = [self.engine.module]  # what stages and evaluation see (a megatron module)
        self.optimizer = ZeroOptimizerView(self.engine)
        self.scheduler = build_scheduler(self.cfg, self.engine.optimizer)
        log.info("deepspeed engine: ZeRO-2 over %d data-parallel ranks, %s, %d micro-batches "
                 "per rank per step", self.dp_size, "bf16" if self.bf16 else "fp32",
                 self.microbatches_per_rank)

    # --- checkpoints ---------------------------------------------------------------------------

    def _maybe_load(self) -> None:
        ck = self.cfg.checkpoint
        resume_from = latest_checkpoint(ck.dir) if ck.dir and ck.resume else None
        if resume_from is not None:
            self.state, data_state = load_deepspeed_checkpoint(resume_from, self.engine,
                                                               self.scheduler)
            self.data.load_state_dict(data_state)
        elif ck.load_dir:
            source = latest_checkpoint(ck.load_dir)
            if source is None:
                raise FileNotFoundError(f"checkpoint.load_dir={ck.load_dir} holds no checkpoint")
            if is_deepspeed_checkpoint(source):
                load_deepspeed_checkpoint(source, self.engine, None, weights_only=True)
            else:  # a megatron-engine checkpoint (e.g. Stage I trained with engine: megatron)
                module = self.engine.module
                load_checkpoint(source, getattr(module, "module", module) if self.bf16 else module,
                                None, None, weights_only=True)
                self.optimizer.reload_model_params()

    def save(self) -> None:
        save_deepspeed_checkpoint(self.cfg.checkpoint.dir, self.engine, self.scheduler,
                                  self.state, self.data.state_dict(), config=self.cfg,
                                  keep_last=self.cfg.checkpoint.keep_last)

    # --- one step -------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float] | None:
        """One optimiser step: forward and backward of this rank's micro-batches, DeepSpeed
        averaging the gradients over micro-batches and ranks, then the ZeRO-2 update."""
        self.stage.on_step(self.state.step, self.model, self.optimizer)
        outputs, work = [], []
        for _ in range(self.microbatches_per_rank):
            batch = next(self.data)
            work.append(self.stage.work(batch))
            output, loss_fn = self.stage.forward_step(batch, self.engine)
            loss, metrics = loss_fn(output)
            self.engine.backward(loss)  # divides by the accumulation steps
            self.engine.step()          # updates only at the accumulation boundary
            outputs.append(metrics)
        self.state.consumed_microbatches += self.cfg.global_batch_size
        metrics, finite = self._reduce_metrics(outputs)
        self._count_step(work, metrics)
        applied = self.engine.was_step_applied()
        if not finite:
            # ZeRO skips an update whose gradient norm is not finite, as a NaN/inf loss gives.
            if applied:
                log.warning("step %d: non-finite loss but finite gradients: DeepSpeed applied "
                            "the update", self.state.step)
            self._skip_step(metrics)
            return None
        self.scheduler.step(increment=1)
        self.state.step += 1
        if not applied:  # non-finite gradients from a finite loss
            self.state.skipped_steps += 1
            return None
        grad_norm = self.engine.get_global_grad_norm()
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics
