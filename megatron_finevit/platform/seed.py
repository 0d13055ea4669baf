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


def set_seed(seed: int, vary_by_data_parallel_rank: bool = False) -> int:
    """Seed every generator on this rank; returns the seed used for the CPU generators.

    Ranks are read from megatron's parallel state when it is initialised (else rank 0). With
    ``vary_by_data_parallel_rank`` data-parallel replicas draw different numbers (e.g. for data
    augmentation); model weights must not depend on it.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    initialised = parallel_state.model_parallel_is_initialized()
    pipeline_rank = parallel_state.get_pipeline_model_parallel_rank() if initialised else 0
    rank_seed = seed + 100 * pipeline_rank
    if vary_by_data_parallel_rank and initialised:
        rank_seed += 10 * parallel_state.get_data_parallel_rank()
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)
    if initialised:
        model_parallel_cuda_manual_seed(rank_seed)
    return rank_seed
