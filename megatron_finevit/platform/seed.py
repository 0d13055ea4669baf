"""Per-rank seeding.

Python/NumPy/torch CPU generators get ``seed + pipeline_rank * 100`` so that the different pipeline
stages do not draw the same numbers, while all tensor-parallel ranks of a stage share them (they
must see identical data and identical dropout outside TP regions). megatron's RNG tracker then
derives the per-TP-rank stream for dropout inside TP regions (seed + 2718 + tp_rank) and keeps the
data-parallel stream shared, as in Megatron-LM's ``_set_random_seed``.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def set_seed(seed: int, pipeline_rank: int = 0, data_parallel_rank: int = 0,
             vary_by_data_parallel_rank: bool = False) -> int:
    """Seed every generator on this rank; returns the seed actually used for the CPU generators.

    With ``vary_by_data_parallel_rank`` data-parallel replicas draw different numbers (e.g. for
    data augmentation); model weights must not depend on it.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    rank_seed = seed + 100 * pipeline_rank
    if vary_by_data_parallel_rank:
        rank_seed += 10 * data_parallel_rank
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        model_parallel_cuda_manual_seed(rank_seed)
    return rank_seed
