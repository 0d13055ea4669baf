"""Stage I (masked image modelling) pieces: the learned mask token and the regression head.

Paper §3.2, Eq. 1: the encoder sees an image with 75% of its patches masked and regresses, at
the masked positions, the features of a frozen DINOv3 teacher. ``MaskToken`` replaces the patch
embedding of masked patches (it lives on the first pipeline stage, inside ``FineViTModel``);
``MIMHead`` maps the encoder's output to the teacher's width (last stage).
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from megatron_finevit.models.heads.common import head_config


class MaskToken(MegatronModule):
    """A learned ``[hidden]`` vector put in place of masked patch embeddings.

    ``forward(hidden [t, 1, h], masked bool [t]) -> [t, 1, h]``. Under sequence parallelism each
    TP rank replaces the masked patches of its own token slice, so the token's gradient is a
    partial sum, all-reduced by megatron (``sequence_parallel`` tag), as for the patch embedding.
    """

    def __init__(self, config):
        super().__init__(config=config)
        self.weight = torch.nn.Parameter(torch.zeros(config.hidden_size, dtype=config.params_dtype))
        if config.perform_initialization:
            config.init_method(self.weight)
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        if masked.shape != hidden.shape[:1] or masked.dtype != torch.bool:
            raise ValueError(f"masked must be bool [{hidden.shape[0]}], got {masked.dtype} "
                             f"{tuple(masked.shape)}")
        return torch.where(masked.view(-1, 1, 1), self.weight.to(hidden.dtype), hidden)


class MIMHead(MegatronModule):
    """Linear regression from the encoder width to the teacher's: ``[N, h] -> [N, teacher_dim]``
    (column-parallel over the output features, gathered, so every TP rank holds the whole
    prediction for the loss)."""

    def __init__(self, config, teacher_dim: int):
        config = head_config(config)
        super().__init__(config=config)
        self.proj = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, teacher_dim, config=config, init_method=config.init_method,
            bias=True, gather_output=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out, _ = self.proj(hidden)
        return out
