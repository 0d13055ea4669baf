"""Multihead attention pooling (MAP) over a THD pack, then a projection to the text width.

SigLIP's pooling head, one learned probe per image: the probe attends to the image's own tokens
(never to another image of the pack), then an MLP block with residual (norm -> MLP -> +), as
SigLIP's ``MultiheadAttentionPoolingHead``, and finally a Linear to the
text-embedding width for the contrastive loss (paper §3.2, Eq. 2).

Attention per image is a segment softmax over the whole pack (scores ``[N, heads]``, max / sum /
weighted sum reduced per image with ``index_add``): memory linear in the number of tokens, no
loop over images, no ``[n, N]`` mask.

Tensor parallel: heads are split across TP ranks (q and k/v column-parallel, output projection
row-parallel), the MLP is column- then row-parallel, the final projection column-parallel and
gathered, so the ``[n, text_dim]`` result is replicated across TP. The k/v projection's output
features are laid out per head as ``[heads, 2 (k, v), head_dim]`` so that a contiguous TP shard
holds whole heads.
"""

from __future__ import annotations

import math

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from megatron_finevit.models.heads.common import head_config
from megatron_finevit.models.norms import TorchNorm


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      segment_ids: torch.Tensor, num_segments: int, scale: float) -> torch.Tensor:
    """One query per segment: ``query [n, H, d]`` attends to the rows of ``key/value [N, H, d]``
    whose ``segment_ids [N]`` equal its index -> ``[n, H, d]``."""
    scores = torch.einsum("thd,thd->th", key, query[segment_ids]) * scale  # [N, H]
    index = segment_ids[:, None].expand_as(scores)
    peak = scores.new_full((num_segments, scores.shape[1]), float("-inf"))
    peak = peak.scatter_reduce(0, index, scores.detach(), "amax")  # softmax is shift-invariant
    weights = torch.exp(scores - peak[segment_ids])
    total = weights.new_zeros(num_segments, scores.shape[1]).index_add(0, segment_ids, weights)
    pooled = value.new_zeros(num_segments, *value.shape[1:]).index_add(
        0, segment_ids, weights[..., None] * value)
    return pooled / total[..., None]


class MAPHead(MegatronModule):
    """``[N, h]`` real image tokens + image boundaries ``cu_seqlens [n + 1]`` -> one embedding
    per image ``[n, text_dim]``."""

    def __init__(self, config, text_dim: int, mlp_ratio: int = 4):
        config = head_config(config)
        super().__init__(config=config)
        h, tp = config.hidden_size, config.tensor_model_parallel_size
        self.heads_local = config.num_attention_heads // tp
        self.head_dim = h // config.num_attention_heads
        self.probe = torch.nn.Parameter(torch.zeros(h, dtype=config.params_dtype))
        if config.perform_initialization:
            config.init_method(self.probe)
        column = dict(config=config, init_method=config.init_method, bias=True, gather_output=False)
        row = dict(config=config, init_method=config.output_layer_init_method, bias=True,
                   input_is_parallel=True, skip_bias_add=False)
        self.q_proj = tensor_parallel.ColumnParallelLinear(h, h, **column)
        self.kv_proj = tensor_parallel.ColumnParallelLinear(h, 2 * h, **column)
        self.out_proj = tensor_parallel.RowParallelLinear(h, h, **row)
        self.norm = TorchNorm(config, h, eps=config.layernorm_epsilon)
        self.fc1 = tensor_parallel.ColumnParallelLinear(h, mlp_ratio * h, **column)
        self.fc2 = tensor_parallel.RowParallelLinear(mlp_ratio * h, h, **row)
        self.text_proj = tensor_parallel.ColumnParallelLinear(
            h, text_dim, config=config, init_method=config.init_method, bias=True,
            gather_output=True)

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(hidden.device)
        if int(lengths.sum()) != hidden.shape[0] or (lengths <= 0).any():
            raise ValueError(f"cu_seqlens {cu_seqlens.tolist()} must cover the {hidden.shape[0]} "
                             "tokens with non-empty images")
        n = lengths.numel()
        segment_ids = torch.repeat_interleave(torch.arange(n, device=hidden.device), lengths)
        query, _ = self.q_proj(self.probe[None])  # [1, H_local · d]
        kv, _ = self.kv_proj(hidden)  # [N, H_local · 2 · d]
        kv = kv.view(-1, self.heads_local, 2, self.head_dim)
        query = query.view(1, self.heads_local, self.head_dim).expand(n, -1, -1)
        pooled = segment_attention(query, kv[:, :, 0], kv[:, :, 1], segment_ids, n,
                                   1.0 / math.sqrt(self.head_dim))
        pooled, _ = self.out_proj(pooled.reshape(n, -1))  # [n, h]
        mlp, _ = self.fc1(self.norm(pooled))
        mlp, _ = self.fc2(torch.nn.functional.gelu(mlp, approximate="tanh"))
        out, _ = self.text_proj(pooled + mlp)
        return out
