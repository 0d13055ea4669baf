"""The training loop (megatron engine): DDP + distributed optimiser, megatron's pipeline schedules,
warm-up + cosine LR, gradient clipping, non-finite-loss skipping, metrics, periodic evaluation,
atomic checkpoints with exact resume, and clean exit on SIGTERM / SIGUSR1.

    python -m megatron_finevit.train --config FILE key.sub=value ...

It knows nothing about what is trained: everything stage-specific comes from a ``Stage``
(``training/stage.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_finevit.config.train import TrainConfig
from megatron_finevit.platform.distributed import collective_device
from megatron_finevit.training.checkpointing import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    write_atomically,
)
from megatron_finevit.training.metrics import (
    DataWaitTimer,
    MetricsSink,
    Throughput,
    data_wait_metrics,
    peak_tflops,
)
from megatron_finevit.training.optim import build_optimizer, build_scheduler
from megatron_finevit.training.preemption import PreemptionHandler, handler_for_run
from megatron_finevit.training.preflight import check_run, launch_world_size

log = logging.getLogger(__name__)


class TooManyBadSteps(RuntimeError):
    """More steps than ``max_bad_steps`` had a non-finite loss."""


def build_stage_module(stage, bf16: bool, vp_stage: int | None = None) -> torch.nn.Module:
    """This pipeline stage's model (its chunk ``vp_stage`` under a virtual pipeline), built by
    the stage, on the GPU if there is one, and in megatron's Float16Module for bf16 (it casts
    inputs and outputs at the pipeline ends)."""
    from megatron.core import parallel_state

    if vp_stage is None:
        model = stage.build_model(pre_process=parallel_state.is_pipeline_first_stage(),
                                  post_process=parallel_state.is_pipeline_last_stage())
    else:  # megatron's get_model: the ends are the first rank's first chunk, the last's last
        where = dict(ignore_virtual=False, vp_stage=vp_stage)
        model = stage.build_model(pre_process=parallel_state.is_pipeline_first_stage(**where),
                                  post_process=parallel_state.is_pipeline_last_stage(**where),
                                  vp_stage=vp_stage)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    return model


def build_model_chunks(stage, cfg: TrainConfig, bf16: bool) -> list:
    """This rank's model chunks, built by the stage and each wrapped in megatron DDP: one, or
    ``parallel.virtual_pipeline_parallel`` (interleaved 1F1B: chunk ``v`` holds the ``v``-th of
    this rank's shares of the layers, as megatron-LM's ``get_model`` builds them)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_finevit.config.errors import ConfigError

    p = cfg.parallel
    vp = p.virtual_pipeline_parallel
    modules = ([build_stage_module(stage, bf16)] if vp == 1 else
               [build_stage_module(stage, bf16, vp_stage=i) for i in range(vp)])
    config = stage.transformer_config()
    # Both are TransformerConfig fields the stage's layers read when built: refuse a run whose
    # stage did not build them in rather than train without what the YAML asked for.
    for key in ("gradient_accumulation_fusion", "tp_comm_overlap"):
        if getattr(p, key) and not getattr(config, key):
            raise ConfigError(f"parallel.{key}: stage {cfg.stage!r} does not build its layers "
                              "with it")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=p.distributed_optimizer,
        overlap_grad_reduce=p.overlap_grad_reduce, overlap_param_gather=p.overlap_param_gather,
        bucket_size=p.bucket_size)
    # later chunks in one bucket each, as megatron-LM's get_model (their gradients are ready
    # only at the end of the backward pass)
    return [DistributedDataParallel(config, ddp_config, module, disable_bucketing=i > 0)
            for i, module in enumerate(modules)]


@contextlib.contextmanager
def params_gathered(model_chunks: list):
    """Every rank holds the full updated weights inside this block. With overlap_param_gather the
    distributed optimizer leaves the all-gather to the next forward's pre-hooks, so evaluation
    and checkpoints gather synchronously and run without the hooks (megatron-LM's training.py
    does the same around eval and save)."""
    hooked = [chunk for chunk in model_chunks
              if getattr(getattr(chunk, "ddp_config", None), "overlap_param_gather", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()


def _unwrap(chunk):
    """DDP (and Float16Module) → the stage's module, for checkpoints."""
    from megatron.core.transformer.module import Float16Module

    module = chunk.module
    return module.module if isinstance(module, Float16Module) else module


def build_trainer(cfg: TrainConfig) -> "Trainer":
    """The trainer for ``cfg.engine``: megatron (3D parallel) or DeepSpeed ZeRO-2 (DP only)."""
    if cfg.engine == "deepspeed":
        from megatron_finevit.training.deepspeed_engine import DeepSpeedTrainer

        return DeepSpeedTrainer(cfg)
    return Trainer(cfg)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        from megatron.core import parallel_state

        from megatron_finevit.platform import (
            ParallelConfig,
            detect_backend,
            init_distributed,
            init_parallel,
            set_seed,
        )

        from megatron_finevit.platform.fast_paths import fast_path_line

        self.cfg = cfg
        # Every problem of the config, layout, batch and input files, before any process group
        # or model exists (UserError: the entry points print one line each and exit 2).
        self.stage = check_run(cfg, launch_world_size())
        p = cfg.parallel
        self.env = init_distributed(detect_backend(cfg.device))
        if dist.get_rank() == 0:
            log.info(fast_path_line())
        init_parallel(ParallelConfig(tensor_parallel=p.tensor_parallel,
                                     pipeline_parallel=p.pipeline_parallel,
                                     context_parallel=p.context_parallel,
                                     sequence_parallel=p.sequence_parallel,
                                     virtual_pipeline=p.virtual_pipeline_parallel
                                     if p.virtual_pipeline_parallel > 1 else None),
                      **self.stage.model_dims())
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        from megatron_finevit.training.batch_schedule import resolve_batch_schedule

        resolve_batch_schedule(cfg, self.stage, self.dp_size)
        if cfg.samples_per_step and cfg.interleaving_problems(self.dp_size):
            from megatron_finevit.config.errors import ConfigError

            raise ConfigError(cfg.interleaving_problems(self.dp_size))
        self.microbatches_per_rank = cfg.global_batch_size // self.dp_size
        set_seed(cfg.seed)
        self.bf16 = cfg.params_dtype() == torch.bfloat16
        self._build_model_and_optimizer()
        self.data = DataWaitTimer(self.stage.build_data(self.dp_rank, self.dp_size))
        self.state = TrainState()
        self._maybe_load()
        self.is_logger = dist.get_rank() == dist.get_world_size() - 1  # last PP stage has the loss
        self.sink = MetricsSink(self.is_logger, cfg.train_steps, cfg.logging.tensorboard_dir,
                                cfg.logging.progress_bar)
        self.throughput = Throughput(dist.get_world_size(), peak_tflops(cfg.logging.peak_tflops))
        self.loss_history: list[float] = []

    def _build_model_and_optimizer(self) -> None:
        """Sets ``model`` (the chunks stages see), ``optimizer`` and ``scheduler``."""
        self.model = build_model_chunks(self.stage, self.cfg, self.bf16)
        self.optimizer = build_optimizer(self.cfg, self.model, self.bf16,
                                         self.stage.optimizer_overrides())
        if len(self.model) > 1:  # the interleaved schedule reads model[0]'s config: every chunk's
            self.model[0].config.no_sync_func = [chunk.no_sync for chunk in self.model]
        self.scheduler = build_scheduler(self.cfg, self.optimizer)

    # --- checkpoints ---------------------------------------------------------------------------

    def _maybe_load(self) -> None:
        ck = self.cfg.checkpoint
        resume_from = latest_checkpoint(ck.dir) if ck.dir and ck.resume else None
        if resume_from is not None:
            self.state, data_state = load_checkpoint(resume_from, self._modules(),
                                                     self.optimizer, self.scheduler)
            if data_state is not None:
                self.data.load_state_dict(data_state)
        elif ck.load_dir:
            source = latest_checkpoint(ck.load_dir)
            if source is None:
                raise FileNotFoundError(f"checkpoint.load_dir={ck.load_dir} holds no checkpoint")
            load_checkpoint(source, self._modules(), None, None, weights_only=True)
            # DDP keeps fp32 main params in the optimizer: copy the loaded weights into them.
            self.optimizer.reload_model_params()

    def _modules(self):
        """The stage's module (its chunks under a virtual pipeline), for checkpoints."""
        modules = [_unwrap(chunk) for chunk in self.model]
        return modules[0] if len(modules) == 1 else modules

    def save(self) -> None:
        with params_gathered(self.model):
            save_checkpoint(self.cfg.checkpoint.dir, self._modules(), self.optimizer,
                            self.scheduler, self.state, self.data.state_dict(),
                            config=asdict(self.cfg), keep_last=self.cfg.checkpoint.keep_last)

    # --- one step -------------------------------------------------------------------------------

    def _forward_step(self, data_iterator, model, work: list | None):
        batch = next(data_iterator)
        if work is not None:
            work.append(self.stage.work(batch))
        return self.stage.forward_step(batch, model)

    def _chunk_iterators(self, data, work: list) -> list:
        """Interleaved 1F1B runs every chunk on each micro-batch, in order: the step's packs are
        read once (their work counted once) and replayed to each chunk."""
        batches = [next(data) for _ in range(self.microbatches_per_rank)]
        work.extend(self.stage.work(batch) for batch in batches)
        return [iter(batches) for _ in self.model]

    def train_step(self) -> dict[str, float] | None:
        """One optimiser step. Returns the metrics (on every rank; loss only meaningful on the
        last pipeline stage), or None when the step was skipped for a non-finite loss."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.stage.on_step(self.state.step, self.model, self.optimizer)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        seq_length, micro_batch_size = self.stage.sequence_shape()
        work: list = []
        data = self.data
        self.microbatches_per_rank = self.cfg.global_batch_at(self.state.step) // self.dp_size
        if hasattr(self.stage, "prepare_step"):  # after zeroing: it may accumulate gradients
            data = self.stage.prepare_step(self.data, self.model, self.microbatches_per_rank)
        interleaved = len(self.model) > 1
        if interleaved:
            data = self._chunk_iterators(data, work)
        outputs = get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, work=None if interleaved else work),
            data_iterator=data,
            model=self.model,
            num_microbatches=self.microbatches_per_rank,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=False,
        )
        self.state.consumed_microbatches += self.microbatches_per_rank * self.dp_size
        metrics, finite = self._reduce_metrics(outputs)
        self._count_step(work, metrics)
        if not finite:
            self._skip_step(metrics)
            return None
        update_ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.state.step += 1
        if not update_ok:
            self.state.skipped_steps += 1
            return None
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    def _reduce_metrics(self, outputs: list[dict]) -> tuple[dict[str, float], bool]:
        """This step's metrics averaged over micro-batches and data-parallel replicas, and
        whether they are finite on every rank."""
        metrics = _mean_metrics(outputs)
        if metrics:  # last pipeline stage: average over the data-parallel replicas
            from megatron.core import parallel_state

            values = torch.tensor(list(metrics.values()), dtype=torch.float64,
                                  device=collective_device())
            dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
            metrics = dict(zip(metrics, (values / self.dp_size).tolist()))
        finite = torch.tensor([1 if all(math.isfinite(v) for v in metrics.values()) else 0],
                              device=collective_device())
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if metrics and hasattr(self.stage, "finalize_metrics"):
            metrics = self.stage.finalize_metrics(metrics)
        return metrics, bool(finite.item())

    def _skip_step(self, metrics: dict[str, float]) -> None:
        """Count a step whose loss was not finite (no update, no LR step); abort past
        ``max_bad_steps``."""
        self.state.skipped_steps += 1
        self.state.step += 1
        if self.state.skipped_steps > self.cfg.max_bad_steps:
            raise TooManyBadSteps(
                f"{self.state.skipped_steps} steps had a non-finite loss (limit "
                f"max_bad_steps={self.cfg.max_bad_steps}); last metrics {metrics}")
        log.warning("step %d: non-finite loss %s, step skipped (%d so far)",
                    self.state.step, metrics, self.state.skipped_steps)

    def _count_step(self, work: list, metrics: dict) -> None:
        """Add the step's work to the throughput and its samples to ``consumed_samples`` (kept
        in checkpoints), and log both (on the rank that logs)."""
        step_samples = self._add_work(work)
        self.state.consumed_samples += int(step_samples)
        if metrics:
            metrics.update(samples_per_step=step_samples,
                           consumed_samples=float(self.state.consumed_samples))

    def _add_work(self, work: list) -> float:
        """Sum (samples, tokens, FLOPs[, {name: count}]) over the data-parallel replicas (first
        PP/TP rank only, so nothing is counted twice); returns the step's samples."""
        from megatron.core import parallel_state as ps

        extras = sorted({name for w in work if len(w) > 3 for name in w[3]})
        local = torch.tensor([sum(w[i] for w in work) for i in range(3)]
                             + [sum(w[3].get(name, 0.0) for w in work if len(w) > 3)
                                for name in extras] if work else [0.0] * 3,
                             dtype=torch.float64, device=collective_device())
        if ps.get_tensor_model_parallel_rank() or ps.get_pipeline_model_parallel_rank() or \
                ps.get_context_parallel_rank():
            local.zero_()
        dist.all_reduce(local)
        totals = local.tolist()
        self.throughput.add(*totals[:3], **dict(zip(extras, totals[3:])))
        return totals[0]

    # --- the loop -------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the current weights (the stage's own evaluation)."""
        for chunk in self.model:
            chunk.eval()
        with torch.no_grad(), params_gathered(self.model):
            results = self.stage.evaluate(self.model)
        for chunk in self.model:
            chunk.train()
        if results:
            self.sink.text("eval step %d | %s" % (self.state.step, " | ".join(
                f"{k} {v:.4f}" for k, v in results.items())))
            if self.sink.writer:
                for k, v in results.items():
                    self.sink.writer.add_scalar(f"eval/{k}", v, self.state.step)
        return results

    def _evaluate_into(self, evaluations: dict, key) -> None:
        """Evaluate, add the results to the run's ``evaluations`` under ``key`` ("start", the
        step, "end") and, with ``eval.results_json``, write them all there (logging rank)."""
        evaluations[key] = self.evaluate()
        if self.cfg.eval.results_json and self.is_logger:
            path = Path(self.cfg.eval.results_json)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps(evaluations, indent=2))

    def _stop_on_signal(self, handler: PreemptionHandler, save: bool) -> None:
        """Every rank has agreed to stop: save (unless no step ran since the last checkpoint),
        then leave the requeue decision to the launcher (``PreemptionHandler.confirm_stop``)."""
        step = self.state.step
        if save:
            self.save()
        saved = "checkpoint saved" if save else "no checkpoint saved"
        self.sink.text(f"stopping at step {step} on signal ({saved})")
        handler.confirm_stop(f"stopped on a signal at step {step} ({saved})")

    def train(self) -> dict:
        cfg = self.cfg
        handler = handler_for_run(cfg.checkpoint.save_on_signal)
        evaluations = {}
        try:
            # the first safe point: a signal that reached any rank during start-up (model, data,
            # checkpoint load) stops every rank here, before a step
            stopped_by_signal = handler is not None and handler.should_stop()
            if stopped_by_signal:
                self._stop_on_signal(handler, save=False)
            if cfg.eval.at_start and self.state.step == 0 and not stopped_by_signal:
                self._evaluate_into(evaluations, "start")
            self.throughput.reset()
            while not stopped_by_signal and self.state.step < cfg.train_steps:
                start = time.perf_counter()
                metrics = self.train_step()
                data_wait_s = self._data_wait_s()
                if metrics is not None and "loss" in metrics:
                    self.loss_history.append(metrics["loss"])
                step = self.state.step
                if metrics is not None and (step % cfg.logging.log_interval == 0 or step == cfg.train_steps):
                    metrics["step_time_s"] = time.perf_counter() - start
                    metrics.update(data_wait_metrics(data_wait_s, metrics["step_time_s"]))
                    metrics.update(self.throughput.rates())
                    self.throughput.reset()
                    self.sink.step(step, metrics)
                if cfg.eval.interval and step % cfg.eval.interval == 0 and step < cfg.train_steps:
                    self._evaluate_into(evaluations, step)
                periodic = cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0
                if handler is not None and handler.should_stop():
                    stopped_by_signal = True
                    self._stop_on_signal(handler, save=bool(cfg.checkpoint.dir))
                    break
                if periodic and step < cfg.train_steps:
                    self.save()
            if not stopped_by_signal:
                if cfg.checkpoint.dir:
                    self.save()
                if cfg.eval.at_end:
                    self._evaluate_into(evaluations, "end")
            return {"state": asdict(self.state), "losses": self.loss_history,
                    "evaluations": evaluations, "stopped_by_signal": stopped_by_signal}
        finally:
            self.data.close()  # decode workers stop with the run, also on an exception
            if handler is not None:
                handler.release()
            self.sink.close()

    def _data_wait_s(self) -> float:
        """Seconds the step waited for data on its slowest rank (a collective: every step)."""
        wait = torch.tensor([self.data.take_wait_s()], dtype=torch.float64,
                            device=collective_device())
        dist.all_reduce(wait, op=dist.ReduceOp.MAX)
        return wait.item()


def _mean_metrics(outputs: list[dict]) -> dict[str, float]:
    """Average each metric over this rank's micro-batches (empty off the last PP stage)."""
    if not outputs:
        return {}
    keys = outputs[0].keys()
    return {k: torch.stack([o[k].float().reshape(()) for o in outputs]).mean().item() for k in keys}
