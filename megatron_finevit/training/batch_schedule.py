"""A constant batch in samples: ``samples_per_step`` -> micro-batches per step in each data phase.

Packs are filled by tokens, so how many samples a pack holds depends on the resolution policy:
Stage II's packs hold ~15 images at 336² and ~8.6 at 448². With a fixed pack count the paper's
49,152-pair batch would fall by ~43% at the switch. With ``samples_per_step`` set, each phase of
the stage (``microbatch_phases()``: its samples per micro-batch, measured by packing the index's
sizes when the data is here, else estimated) gets

    micro-batches = max(1, round(samples_per_step / samples_per_micro_batch / DP)) · DP

so every DP rank runs the same count and a step holds ``samples_per_step`` samples up to the
rounding to DP (± DP / 2 micro-batches) and the packs' spread around their mean. The LR schedule
stays in steps; ``train_steps`` · ``samples_per_step`` is the run's sample count.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def micro_batches_for(samples_per_step: int, samples_per_micro_batch: float,
                      data_parallel: int) -> int:
    """Micro-batches (all DP ranks) holding ``samples_per_step`` samples, a multiple of DP."""
    per_rank = round(samples_per_step / max(samples_per_micro_batch, 1e-9) / data_parallel)
    return max(1, per_rank) * data_parallel


def resolve_batch_schedule(cfg, stage, data_parallel: int, announce: bool = True) -> None:
    """With ``cfg.samples_per_step`` set, write the per-phase micro-batch counts into
    ``cfg.global_batch_size`` (step 0's) and ``cfg.global_batch_schedule`` (later phases), and
    log them when ``announce``; a run without it is left as it is."""
    if not cfg.samples_per_step:
        return
    if not hasattr(stage, "microbatch_phases"):
        raise ValueError(f"samples_per_step needs a stage with data phases; stage "
                         f"{cfg.stage!r} has a fixed number of samples per micro-batch")
    counts = [(phase.start_step, micro_batches_for(cfg.samples_per_step, phase.samples,
                                                   data_parallel))
              for phase in stage.microbatch_phases(data_parallel)]
    cfg.global_batch_size = counts[0][1]
    cfg.global_batch_schedule = [[start, n] for start, n in counts[1:]]
    (log.info if announce else log.debug)("samples_per_step=%d: micro-batches per step %s (DP %d)", cfg.samples_per_step,
             ", ".join(f"{n} from step {start}" for start, n in counts), data_parallel)
