"""``python -m megatron_finevit.train --config FILE --dry-run --world-size N``: a run's batch
arithmetic on ``N`` ranks, as ``key=value`` lines a script can read, from the config alone (no
process group, no model, no GPU; ``training.preflight`` has validated it first).

A step is ``global_batch_size`` micro-batches split over the data-parallel ranks; how many samples
a micro-batch holds is the stage's business (``Stage.microbatch_phases``: a FineViT pack's images
depend on the resolution phase). Printed, in order::

    world_size, tensor_parallel, pipeline_parallel, context_parallel, data_parallel,
    global_batch_size, micro_batches_per_rank, tokens_per_micro_batch, tokens_per_step,
    train_steps
    per phase: phase_start_step, phase_steps, phase_micro_batches (``samples_per_step`` makes
        it follow the phase's samples per micro-batch), the stage's details (max_pixels,
        mean_tokens_per_sample, samples_estimate, context_length ...), samples_per_micro_batch,
        samples_per_step
    total_samples

Phases that start at or after ``train_steps`` are never reached and not printed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MicrobatchPhase:
    """From ``start_step`` on, a micro-batch holds ``samples`` samples (an estimate);
    ``details`` are printed with it as ``key=value`` (what the estimate rests on)."""

    start_step: int
    samples: float
    details: dict = field(default_factory=dict)


def dry_run_lines(cfg, stage, world_size: int) -> list[str]:
    """The report for a validated run ``cfg`` with its constructed ``stage`` on ``world_size``
    ranks (``global_batch_size`` divides evenly over the data-parallel ranks)."""
    from megatron_finevit.training.batch_schedule import resolve_batch_schedule

    p = cfg.parallel
    data_parallel = world_size // (p.tensor_parallel * p.pipeline_parallel * p.context_parallel)
    # samples_per_step -> packs per phase (printed below as phase_micro_batches)
    resolve_batch_schedule(cfg, stage, data_parallel, announce=False)
    seq_length, micro_batch_size = stage.sequence_shape()
    tokens = seq_length * micro_batch_size
    values = {"world_size": world_size, "tensor_parallel": p.tensor_parallel,
              "pipeline_parallel": p.pipeline_parallel, "context_parallel": p.context_parallel,
              "data_parallel": data_parallel, "global_batch_size": cfg.global_batch_size,
              "micro_batches_per_rank": cfg.global_batch_size // data_parallel,
              "tokens_per_micro_batch": tokens, "tokens_per_step": tokens * cfg.global_batch_size,
              "train_steps": cfg.train_steps}
    lines = [f"{key}={value}" for key, value in values.items()]
    # a stage without phases (the toy LM) has micro_batch_size samples per micro-batch throughout
    phases = (stage.microbatch_phases() if hasattr(stage, "microbatch_phases")
              else [MicrobatchPhase(0, float(micro_batch_size))])
    reached = [phase for phase in phases if phase.start_step < cfg.train_steps] or phases[:1]
    total = 0
    for number, phase in enumerate(reached):
        end = reached[number + 1].start_step if number + 1 < len(reached) else cfg.train_steps
        steps = max(end - phase.start_step, 0)
        micro_batches = cfg.global_batch_at(phase.start_step)
        samples_per_step = round(phase.samples * micro_batches)
        total += samples_per_step * steps
        lines += [f"phase_start_step={phase.start_step}", f"phase_steps={steps}",
                  f"phase_micro_batches={micro_batches}"]
        lines += [f"{key}={value}" for key, value in phase.details.items()]
        lines += [f"samples_per_micro_batch={phase.samples:.2f}",
                  f"samples_per_step={samples_per_step}"]
    return lines + [f"total_samples={total}"]
