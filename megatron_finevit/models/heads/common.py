"""What every head shares: a view of the encoder's megatron config for whole-token inputs."""

from __future__ import annotations

import copy


def head_config(config):
    """The encoder's ``TransformerConfig`` with sequence parallelism off.

    Heads take the encoder's output gathered over TP (``[N, h]`` replicated on every TP rank), so
    their column-parallel layers must not all-gather along the sequence again and their norms'
    gradients are complete on every rank (not partial sums to be all-reduced). A shallow copy
    keeps every other setting (dtype, init, TP size) identical.
    """
    if not config.sequence_parallel:
        return config
    view = copy.copy(config)
    view.sequence_parallel = False
    return view
