"""The 2×2 patch-merge projector g(·) between FineViT and the LLM (paper §3.2, Eq. 3).

norm -> concatenate the 4 patches of each 2×2 merge window -> Linear(4h, 4h) -> GELU ->
Linear(4h, llm_hidden), as Qwen2.5-VL's merger. Patches are merge-window-major (see
``models.vit.patch_embed``), so the concatenation is a reshape of 4 consecutive tokens.

Tensor parallel: the first Linear is column-parallel (each rank a slice of the 4h features), the
second row-parallel (partial sums all-reduced), so the output is replicated across TP.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from megatron_finevit.models.heads.common import head_config
from megatron_finevit.models.norms import TorchNorm


class MergeProjector(MegatronModule):
    """``[N, h]`` real image tokens of a pack (every image a multiple of ``merge_size²``
    tokens) -> ``[N / merge_size², out_dim]``, one row per merge window, in pack order."""

    def __init__(self, config, out_dim: int, merge_size: int = 2):
        config = head_config(config)
        super().__init__(config=config)
        self.window = merge_size * merge_size
        merged = config.hidden_size * self.window
        self.norm = TorchNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
        self.fc1 = tensor_parallel.ColumnParallelLinear(
            merged, merged, config=config, init_method=config.init_method, bias=True,
            gather_output=False)
        self.fc2 = tensor_parallel.RowParallelLinear(
            merged, out_dim, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False)

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """``cu_seqlens`` (of the images), if given, is checked: windows must not straddle images."""
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]) if cu_seqlens is not None else None
        if hidden.shape[0] % self.window or (lengths is not None and (lengths % self.window).any()):
            raise ValueError(f"every image needs a multiple of {self.window} tokens (2x2 merge "
                             f"windows); got {hidden.shape[0]} tokens"
                             + (f", images of {lengths.tolist()}" if lengths is not None else ""))
        merged = self.norm(hidden).reshape(-1, self.window * hidden.shape[-1])
        out, _ = self.fc1(merged)
        out, _ = self.fc2(torch.nn.functional.gelu(out))
        return out
