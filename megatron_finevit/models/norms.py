"""Torch LayerNorm / RMSNorm for the ``local`` layer spec, with sequence-parallel support.

megatron-core's ``WrappedTorchNorm`` (the fallback when neither TransformerEngine nor Apex is
installed) asserts ``not config.sequence_parallel``. Nothing in the maths forbids it: under
sequence parallelism each TP rank normalises its own slice of the sequence with a replicated
weight, so the weight's gradient is a partial sum that megatron's ``finalize_model_grads``
all-reduces over the TP group for every parameter tagged ``sequence_parallel = True`` (what TE's and
Apex's norms do). This builder does exactly that and nothing else.
"""

from __future__ import annotations

import torch


def TorchNorm(config, hidden_size: int, eps: float = 1e-5, **_unused) -> torch.nn.Module:
    """Build ``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm`` per ``config.normalization``.

    Signature matches megatron's norm builders (``config, hidden_size, eps``); extra keyword
    arguments megatron passes (persist_layer_norm, zero_centered_gamma, normalization) are ignored
    after validation.
    """
    if config.layernorm_zero_centered_gamma:
        raise ValueError("layernorm_zero_centered_gamma needs the te spec (TransformerEngine norms)")
    norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
    if config.normalization not in norms:
        raise ValueError(f"normalization must be one of {sorted(norms)}, got {config.normalization!r}")
    norm = norms[config.normalization](normalized_shape=hidden_size, eps=eps)
    if config.sequence_parallel:
        for param in norm.parameters():
            param.sequence_parallel = True
    return norm
