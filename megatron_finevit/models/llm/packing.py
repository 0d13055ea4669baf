"""Packed (THD) language-model input: several samples in one ``[1, T]`` row, each its own segment.

megatron's ``GPTModel`` takes a pack as batch 1 with ``PackedSeqParams(qkv_format="thd")``: the
core attention keeps every segment causal within itself and never across, and RoPE restarts at
position 0 per segment, from ``cu_seqlens`` alone (``rope_utils._apply_rotary_pos_emb_thd``, when
the rotary table has ``max_seqlen`` rows, fewer than ``T``) — ``position_ids`` are not read. So
the positions a caller passes are checked against the segments here instead of being trusted.
The padding tail of a fixed-size pack is a segment of its own (its labels masked by the caller).
"""

from __future__ import annotations

from typing import Sequence

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_finevit.models.attention.context_parallel import check_cp_divisible


def thd_packed_seq_params(cu_seqlens: torch.Tensor | Sequence[int]) -> PackedSeqParams:
    """Self-attention ``PackedSeqParams`` for segments ending at ``cu_seqlens`` (int32
    ``[n + 1]``, from 0 to ``T``). ``max_seqlen`` is the longest segment: megatron sizes the
    rotary table by it, and a table of ``T`` rows would be read as per-token positions."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int32)
    lengths = cu[1:] - cu[:-1]
    if cu.ndim != 1 or len(cu) < 2 or int(cu[0]) != 0 or bool((lengths <= 0).any()):
        raise ValueError(f"cu_seqlens must rise strictly from 0, got {cu.tolist()}")
    longest = int(lengths.max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def segment_positions(cu_seqlens: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """int64 ``[T]``: ``0, 1, ...`` restarting at every segment start — the positions megatron's
    THD RoPE uses."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths)
    return torch.arange(int(cu[-1])) - starts


def check_packed_input(input_ids: torch.Tensor | None, position_ids: torch.Tensor | None,
                       params: PackedSeqParams, sequence_multiple: int = 1,
                       context_parallel: int = 1) -> None:
    """Raise ValueError unless ``input_ids`` / ``position_ids`` ``[1, T]`` form one THD pack of
    ``params`` (``T = cu_seqlens[-1]``; ``T / context_parallel`` a multiple of
    ``sequence_multiple`` — TP under sequence parallelism, which splits each CP rank's tokens
    evenly; under context parallelism every segment a multiple of ``2·context_parallel``, the
    zigzag split of ``models.attention.context_parallel``; positions restarting per segment).
    Either tensor may be None (pipeline stages that do not read it)."""
    if params.qkv_format != "thd":
        raise ValueError(f"packed input needs qkv_format 'thd', got {params.qkv_format!r}")
    check_cp_divisible(params.cu_seqlens_q.cpu(), context_parallel)
    total = int(params.cu_seqlens_q[-1])
    if total % (sequence_multiple * context_parallel):
        raise ValueError(f"a pack of {total} tokens does not split over {sequence_multiple} "
                         f"sequence-parallel ranks (x {context_parallel} context-parallel): make "
                         f"the token budget a multiple of {sequence_multiple * context_parallel}")
    for name, tensor in (("input_ids", input_ids), ("position_ids", position_ids)):
        if tensor is not None and tuple(tensor.shape) != (1, total):
            raise ValueError(f"packed {name} must be [1, {total}] (cu_seqlens end at {total}), "
                             f"got {list(tensor.shape)}")
    if position_ids is not None and not torch.equal(
            position_ids[0].cpu(), segment_positions(params.cu_seqlens_q.cpu())):
        raise ValueError("packed position_ids must restart at 0 at every cu_seqlens segment "
                         "(megatron's THD RoPE does; see segment_positions)")
