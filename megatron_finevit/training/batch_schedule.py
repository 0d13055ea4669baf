"""A constant batch in samples: ``samples_per_step`` -> micro-batches per step in each data phase.

Packs are filled by tokens, so how many samples a pack holds depends on the resolution policy:
Stage II's packs hold ~15 images at 336² and ~8.6 at 448². With a fixed pack count the paper's
49,152-pair batch would fall by ~43% at the switch. With ``samples_per_step`` set, each phase of
the stage (``microbatch_phases()``: its samples per micro-batch, measured by packing the index's
sizes when the data is here, else estimated) gets

    micro-batches = max(1, round(samples_per_step / samples_per_micro_batch / DP)) · DP

so every DP rank runs the same count. Whole packs per rank alone would miss the target by up to
half a pack per rank (±2% at Stage II's ~26 packs a rank); with ``samples_per_step_fill`` (the
default) a stage that can (``fit_fill_tokens``: the index is here) first rounds the packs per
rank up and fills them to fewer tokens, found by packing the index's sizes, so that those packs
hold ``samples_per_step``: a step then misses it only by the packs' spread around their mean
(±0.7% measured on 8,192-sample steps, tests/training/test_batch_schedule.py), at the price of
< 1 / packs-per-rank padding. The LR schedule stays in steps; ``train_steps`` ·
``samples_per_step`` is the run's sample count.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable

log = logging.getLogger(__name__)


def micro_batches_for(samples_per_step: int, samples_per_micro_batch: float,
                      data_parallel: int) -> int:
    """Micro-batches (all DP ranks) holding ``samples_per_step`` samples, a multiple of DP."""
    per_rank = round(samples_per_step / max(samples_per_micro_batch, 1e-9) / data_parallel)
    return max(1, per_rank) * data_parallel


def fill_for_samples(samples_per_pack: Callable[[int], float], samples_per_step: int,
                     data_parallel: int, largest_sample: int, pack_tokens: int) -> int:
    """The tokens to fill each pack with so that the packs per rank that full packs need,
    rounded up, hold ``samples_per_step``.

    ``samples_per_pack(fill)``: the mean samples a pack holds when filled to ``fill`` tokens
    (grows with it). Bisection between ``largest_sample`` (every sample must still fit) and
    ``pack_tokens``; the fill whose packs come closest to ``samples_per_step / (packs per rank ·
    DP)`` samples."""
    samples_per_pack = functools.lru_cache(maxsize=None)(samples_per_pack)  # each fill packs once
    per_rank = math.ceil(samples_per_step / samples_per_pack(pack_tokens) / data_parallel)
    target = samples_per_step / (per_rank * data_parallel)
    low, high = min(largest_sample, pack_tokens), pack_tokens
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if samples_per_pack(middle) > target else (middle, high)
    return min((low, high), key=lambda fill: abs(samples_per_pack(fill) - target))


def resolve_batch_schedule(cfg, stage, data_parallel: int, announce: bool = True) -> None:
    """With ``cfg.samples_per_step`` set, write the per-phase micro-batch counts into
    ``cfg.global_batch_size`` (step 0's) and ``cfg.global_batch_schedule`` (later phases), and
    log them when ``announce``; a run without it is left as it is."""
    if not cfg.samples_per_step:
        return
    if not hasattr(stage, "microbatch_phases"):
        raise ValueError(f"samples_per_step needs a stage with data phases; stage "
                         f"{cfg.stage!r} has a fixed number of samples per micro-batch")
    if cfg.samples_per_step_fill and hasattr(stage, "fit_fill_tokens"):
        stage.fit_fill_tokens(cfg.samples_per_step, data_parallel)
    counts = [(phase.start_step, micro_batches_for(cfg.samples_per_step, phase.samples,
                                                   data_parallel))
              for phase in stage.microbatch_phases(data_parallel)]
    cfg.global_batch_size = counts[0][1]
    cfg.global_batch_schedule = [[start, n] for start, n in counts[1:]]
    (log.info if announce else log.debug)("samples_per_step=%d: micro-batches per step %s (DP %d)", cfg.samples_per_step,
             ", ".join(f"{n} from step {start}" for start, n in counts), data_parallel)
