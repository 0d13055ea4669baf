"""Core attention for packed sequences, with context parallelism: a megatron ``core_attention``.

Each packed segment (an image, a document, the padding tail) attends only to itself —
bidirectionally (``AttnMaskType.no_mask`` / ``padding``) or causally (``causal`` /
``padding_causal``) — and is computed on its own, so memory grows with the number of segments,
never as a ``[T, T]`` mask over the pack (see ``kernels``).

Under context parallelism (CP group of megatron's ``pg_collection.cp``) each rank holds the query,
key and value rows of its chunks (layout and what the caller passes: ``context_parallel``). K and
V are all-gathered over the CP group with a differentiable collective (backward: reduce-scatter of
dK/dV), reassembled per segment, and each local query chunk attends to the keys of its segment
— causally up to its own global position. Outputs and gradients equal the CP = 1 run.

Used by megatron's ``Attention`` as ``SelfAttentionSubmodules(core_attention=PackedCoreAttention)``
in the local layer spec; the TE spec uses ``TEDotProductAttention`` instead.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

from megatron_finevit.models.attention.context_parallel import (
    cu_seqlens_list,
    check_cp_divisible,
    gather_from_cp,
    local_chunks,
)
from megatron_finevit.models.attention.kernels import AttentionBlocks, attend_blocks

_BIDIRECTIONAL = (AttnMaskType.no_mask, AttnMaskType.padding)
_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     cu_seqlens: torch.Tensor | Sequence[int], *, causal: bool,
                     softmax_scale: float | None = None,
                     cu_seqlens_padded: torch.Tensor | Sequence[int] | None = None,
                     cp_group: dist.ProcessGroup | None = None,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Attention within each packed segment.

    Args:
        query: ``[t, np, hn]`` — this CP rank's tokens (``t = T / cp``; all ``T`` without CP).
        key, value: ``[t, ng, hn]``, ``ng`` dividing ``np`` (grouped-query attention).
        cu_seqlens: global segment boundaries of the full pack, ``[n + 1]``.
        causal: causal within each segment (else bidirectional).
        softmax_scale: defaults to ``1 / sqrt(hn)``.
        cu_seqlens_padded: global boundaries including per-segment padding (megatron's
            ``cu_seqlens_q_padded``); the layout follows them, real tokens are the first
            ``cu_seqlens[i+1] - cu_seqlens[i]`` of segment ``i`` and only they are attended to
            (bidirectional) — causal queries never reach the trailing padding anyway.
        cp_group: the context-parallel group (``None``: no CP).

    Returns ``[t, np, hn]``. A segment with no real tokens gives zeros (bidirectional).
    """
    cp_size = dist.get_world_size(cp_group) if cp_group is not None else 1
    cp_rank = dist.get_rank(cp_group) if cp_group is not None else 0
    valid = _lengths(cu_seqlens_list(cu_seqlens))
    bounds = cu_seqlens_list(cu_seqlens if cu_seqlens_padded is None else cu_seqlens_padded)
    lengths = check_cp_divisible(bounds, cp_size)
    if len(valid) != len(lengths) or any(v > n for v, n in zip(valid, lengths)):
        raise ValueError(f"segment lengths {valid} do not fit their padded lengths {lengths}")
    if query.shape[0] * cp_size != bounds[-1] or key.shape[0] != query.shape[0]:
        raise ValueError(
            f"packed q/k have {query.shape[0]}/{key.shape[0]} tokens on each of {cp_size} CP ranks "
            f"but cu_seqlens end at {bounds[-1]}: the padding tail of a pack must be its own "
            f"segment")
    if cp_size > 1:  # one collective for K and V: [t, 2·ng, hn] -> [T, 2·ng, hn]
        kv = gather_from_cp(torch.cat([key, value], dim=1), bounds, cp_group)
        key, value = kv.split(key.shape[1], dim=1)
    blocks = _segment_blocks(bounds, lengths, valid, cp_size, cp_rank, causal)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(query.shape[-1])
    return attend_blocks(query, key, value, blocks, scale, dropout_p)


def _lengths(bounds: list[int]) -> list[int]:
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _segment_blocks(bounds, lengths, valid, cp_size, cp_rank, causal) -> AttentionBlocks:
    """Which full-pack keys each run of local queries sees. Bidirectional: a segment's local
    chunks (contiguous locally) see its real tokens. Causal: each chunk sees its segment's keys up
    to its own last global position (bottom-right aligned)."""
    q_lengths, k_starts, k_lengths = [], [], []

    def block(n_queries: int, key_start: int, n_keys: int) -> None:
        q_lengths.append(n_queries)
        k_starts.append(key_start)
        k_lengths.append(n_keys)

    for start, length, n_valid in zip(bounds, lengths, valid):
        chunks = local_chunks(length, cp_size, cp_rank)
        if causal:
            for offset, n in chunks:
                block(n, start, offset + n)
        else:
            block(sum(n for _, n in chunks), start, n_valid)
    return AttentionBlocks(tuple(q_lengths), tuple(k_starts), tuple(k_lengths), causal)


class PackedCoreAttention(MegatronModule):
    """megatron ``core_attention`` for THD packed sequences (and plain SBHD), with CP.

    THD (``packed_seq_params.qkv_format == 'thd'``): q ``[t, np, hn]``, k/v ``[t, ng, hn]`` ->
    ``[t, np·hn]``; segments from ``packed_seq_params.cu_seqlens_q`` (global, see
    ``context_parallel``), ``cu_seqlens_q_padded`` honoured. SBHD (no ``packed_seq_params``):
    ``[s, b, np, hn]`` -> ``[s, b, np·hn]``, each batch column one sequence (under CP laid out as
    megatron's per-sequence zigzag: chunks r and 2cp−1−r).

    Masking comes from ``attn_mask_type`` and the segment boundaries; ``attention_mask`` is
    ignored (as TE does for THD), and SBHD padding masks are refused — pack with cu_seqlens
    instead. ``apply_query_key_layer_scaling`` needs no handling: megatron divides the scale by
    the layer number and multiplies it back inside its softmax, a no-op on the result.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection: ProcessGroupCollection | None = None, **kwargs):
        super().__init__(config=config)
        if attn_mask_type not in _BIDIRECTIONAL + _CAUSAL:
            raise ValueError(f"PackedCoreAttention supports {_BIDIRECTIONAL + _CAUSAL}, "
                             f"got {attn_mask_type}")
        if attention_type != "self":
            raise NotImplementedError("PackedCoreAttention is self-attention only")
        if cp_comm_type not in (None, "all_gather"):
            raise ValueError(f"PackedCoreAttention implements context parallelism by all-gather of "
                             f"K/V; cp_comm_type={cp_comm_type!r} needs the TE spec")
        if config.softmax_type != "vanilla":
            raise NotImplementedError(f"softmax_type={config.softmax_type!r} needs the TE spec")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                     layer_number):
            raise NotImplementedError("sliding-window attention needs the TE spec")
        if config.context_parallel_size == 1:
            # Not context-parallel, even inside a CP run: a tower replicated over the CP ranks
            # (Stage II's text tower beside a CP encoder) attends over its whole rows.
            self.cp_group = None
        else:
            if pg_collection is None:
                pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["cp"])
            self.cp_group = pg_collection.cp
        cp_size = dist.get_world_size(self.cp_group) if self.cp_group is not None else 1
        if cp_size != config.context_parallel_size:
            raise ValueError(f"CP group of size {cp_size} but config.context_parallel_size = "
                             f"{config.context_parallel_size}")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = (softmax_scale if softmax_scale is not None
                              else 1.0 / math.sqrt(config.kv_channels))
        self.dropout_p = (config.attention_dropout if attention_dropout is None
                          else attention_dropout)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("attention_bias needs the TE spec")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if mask_type not in _BIDIRECTIONAL + _CAUSAL:
            raise ValueError(f"unsupported attn_mask_type {mask_type}")
        causal = mask_type in _CAUSAL
        dropout_p = self.dropout_p if self.training else 0.0
        # Inside tensor-parallel regions dropout draws from the model-parallel RNG stream, as
        # megatron's DotProductAttention does.
        rng = (tensor_parallel.get_cuda_rng_tracker().fork()
               if dropout_p > 0 and not self.config.sequence_parallel else contextlib.nullcontext())
        with rng:
            if packed_seq_params is not None:
                return self._forward_thd(query, key, value, packed_seq_params, causal, dropout_p)
            if mask_type in (AttnMaskType.padding, AttnMaskType.padding_causal):
                raise NotImplementedError("padding masks are not supported for SBHD input: pack "
                                          "the sequences (THD, PackedSeqParams) instead")
            return self._forward_sbhd(query, key, value, causal, dropout_p)

    def _forward_thd(self, query, key, value, params: PackedSeqParams, causal, dropout_p):
        if params.qkv_format != "thd":
            raise ValueError(
                f"PackedCoreAttention takes qkv_format 'thd', got {params.qkv_format!r}")
        kv_bounds = params.cu_seqlens_kv
        if kv_bounds is not None and kv_bounds is not params.cu_seqlens_q and not torch.equal(
                kv_bounds, params.cu_seqlens_q):
            raise NotImplementedError("different query and key segments (cross-attention)")
        if params.local_cp_size not in (None, self.config.context_parallel_size):
            raise NotImplementedError("hybrid context parallelism needs the TE spec")
        out = packed_attention(query, key, value, params.cu_seqlens_q, causal=causal,
                               softmax_scale=self.softmax_scale,
                               cu_seqlens_padded=params.cu_seqlens_q_padded,
                               cp_group=self.cp_group, dropout_p=dropout_p)
        return out.reshape(out.shape[0], -1)

    def _forward_sbhd(self, query, key, value, causal, dropout_p):
        s, b = query.shape[:2]
        cp_size = dist.get_world_size(self.cp_group) if self.cp_group is not None else 1
        # Each batch column is one segment of the global length s·cp: [s, b, h, d] -> [b·s, h, d].
        cu_seqlens = [j * s * cp_size for j in range(b + 1)]
        out = packed_attention(*(x.transpose(0, 1).reshape(b * s, *x.shape[2:])
                                 for x in (query, key, value)),
                               cu_seqlens, causal=causal, softmax_scale=self.softmax_scale,
                               cp_group=self.cp_group, dropout_p=dropout_p)
        return out.reshape(b, s, -1).transpose(0, 1).contiguous()
