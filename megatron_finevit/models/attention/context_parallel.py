"""Context-parallel (CP) layout of packed sequences, and the collectives that undo it.

Layout (the one megatron's THD RoPE and Transformer Engine's ``thd_get_partitioned_indices`` use)
----------------------------------------------------------------------------------------------
A pack is ``T`` tokens in THD order, cut into segments by ``cu_seqlens`` (int32, ``[n + 1]``,
``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == T``; the padding tail of a fixed-size pack is its own
segment). Under CP of size ``cp`` every segment ``i`` of length ``L_i`` must be a multiple of
``2·cp`` (zero is allowed); it is cut in ``2·cp`` chunks of ``c_i = L_i / (2·cp)`` tokens, and
CP rank ``r`` holds chunks ``r`` and ``2·cp − 1 − r`` of every segment. Rank ``r``'s local
pack is, segment after segment,

    [seg 0 chunk r | seg 0 chunk 2cp−1−r | seg 1 chunk r | seg 1 chunk 2cp−1−r | ...]

so it has ``T / cp`` tokens and its local segment boundaries are ``cu_seqlens // cp``
(``cp_cu_seqlens``). Pairing an early chunk with a late one balances causal attention work.
Example, ``cu_seqlens = [0, 8, 12]``, ``cp = 2``: rank 0 holds global tokens
``[0, 1, 6, 7, 8, 11]``, rank 1 holds ``[2, 3, 4, 5, 9, 10]``.

When segments carry their own padding (``cu_seqlens_padded`` in megatron's ``PackedSeqParams``),
the layout is defined by the padded boundaries; the real tokens are the first ones of each padded
segment.

What the caller passes under CP (megatron ``Attention`` + ``PackedCoreAttention``)
- hidden states: this rank's local tokens, ``partition_for_cp(full, cu_seqlens, cp, rank)``;
- ``PackedSeqParams``: the GLOBAL ``cu_seqlens_q/kv`` (and ``*_padded``) of the full pack, not
  the local ones — megatron's RoPE and our attention derive the local layout themselves;
- RoPE ``freqs``: the FULL pack's per-token table ``[T, 1, 1, d]``. megatron's
  ``_apply_rotary_pos_emb_thd`` recognises ``freqs.size(0) == cu_seqlens[-1]`` and picks this
  rank's rows with the layout above; a local ``[T / cp, ...]`` table would instead be read as
  "positions restart at 0 in every segment" and be silently wrong.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

# torch >= 2.10 renamed the single-tensor collectives; older torch (the GPU containers) has only
# the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def cu_seqlens_list(cu_seqlens: torch.Tensor | Sequence[int]) -> list[int]:
    values = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D, got shape {tuple(cu_seqlens.shape)}")
    if not values or values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and not decrease, got {values}")
    return [int(v) for v in values]


def check_cp_divisible(cu_seqlens: torch.Tensor | Sequence[int], cp_size: int) -> list[int]:
    """Segment lengths of ``cu_seqlens``; raise if one is not a multiple of ``2·cp_size``."""
    bounds = cu_seqlens_list(cu_seqlens)
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if cp_size > 1:
        bad = [(i, n) for i, n in enumerate(lengths) if n % (2 * cp_size)]
        if bad:
            raise ValueError(
                f"context parallel size {cp_size} needs every packed segment to be a multiple of "
                f"2*cp = {2 * cp_size} tokens (pad each segment, see cp_padded_length); "
                f"(segment, length) pairs that are not: {bad}")
    return lengths


def cp_padded_length(length: int, cp_size: int) -> int:
    """Smallest multiple of ``2·cp_size`` that holds ``length`` tokens (``length`` if cp == 1)."""
    multiple = 2 * cp_size if cp_size > 1 else 1
    return -(-length // multiple) * multiple


def local_chunks(length: int, cp_size: int, cp_rank: int) -> list[tuple[int, int]]:
    """``(start within the segment, length)`` of the chunks of one segment that ``cp_rank``
    holds, in local order."""
    if cp_size == 1:
        return [(0, length)]
    chunk = length // (2 * cp_size)
    return [(cp_rank * chunk, chunk), ((2 * cp_size - 1 - cp_rank) * chunk, chunk)]


def cp_partition_index(cu_seqlens: torch.Tensor | Sequence[int], cp_size: int, cp_rank: int,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """Global token index of each of ``cp_rank``'s local tokens: int64 ``[T / cp]``."""
    bounds = cu_seqlens_list(cu_seqlens)
    lengths = check_cp_divisible(bounds, cp_size)
    pieces = [torch.arange(start + s, start + s + n)
              for start, length in zip(bounds, lengths)
              for s, n in local_chunks(length, cp_size, cp_rank)]
    index = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return index.to(device) if device is not None else index


def cp_cu_seqlens(cu_seqlens: torch.Tensor, cp_size: int) -> torch.Tensor:
    """Local segment boundaries ``cu_seqlens // cp`` of every CP rank (same dtype/device)."""
    check_cp_divisible(cu_seqlens, cp_size)
    return cu_seqlens // cp_size


def partition_for_cp(tensor_thd: torch.Tensor, cu_seqlens: torch.Tensor | Sequence[int],
                     cp_size: int, cp_rank: int, dim: int = 0) -> torch.Tensor:
    """This rank's tokens of a full pack: ``[T, ...] -> [T / cp, ...]`` along ``dim``."""
    if cp_size == 1:
        return tensor_thd
    index = cp_partition_index(cu_seqlens, cp_size, cp_rank, device=tensor_thd.device)
    return tensor_thd.index_select(dim, index)


def _rank_major_to_global(cu_seqlens: torch.Tensor | Sequence[int], cp_size: int,
                          device: torch.device) -> torch.Tensor:
    """``p`` with ``full[g] = concat(rank 0 part, rank 1 part, ...)[p[g]]``: int64 ``[T]``."""
    owners = torch.cat([cp_partition_index(cu_seqlens, cp_size, r) for r in range(cp_size)])
    inverse = torch.empty_like(owners)
    inverse[owners] = torch.arange(owners.numel())
    return inverse.to(device)


def merge_cp_partitions(parts: Sequence[torch.Tensor],
                        cu_seqlens: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Inverse of ``partition_for_cp`` along dim 0: per-rank parts (rank order) -> ``[T, ...]``."""
    gathered = torch.cat(list(parts), dim=0)
    return gathered.index_select(0, _rank_major_to_global(cu_seqlens, len(parts), gathered.device))


class _AllGatherFirstDim(torch.autograd.Function):
    """All-gather along dim 0 in rank order. Backward, ``reduce_grad``: reduce-scatter, so every
    rank gets the sum of all ranks' gradients for the rows it contributed (each rank computes
    something different from the gathered tensor: attention of its own queries); else every rank
    keeps its own rows of its gradient (each rank computes the same thing from the gathered
    tensor, so its gradient is already the whole one: megatron's ``tensor_parallel_output_grad=
    False``)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, reduce_grad: bool) -> torch.Tensor:
        ctx.group, ctx.reduce_grad = group, reduce_grad
        size = dist.get_world_size(group)
        out = local.new_empty((size * local.shape[0], *local.shape[1:]))
        _all_gather_single(out, local.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows = grad.shape[0] // dist.get_world_size(ctx.group)
        if not ctx.reduce_grad:
            start = dist.get_rank(ctx.group) * rows
            return grad[start:start + rows].contiguous(), None, None
        out = grad.new_empty((rows, *grad.shape[1:]))
        _reduce_scatter_single(out, grad.contiguous(), group=ctx.group)
        return out, None, None


def all_gather_cp(local: torch.Tensor, group, reduce_grad: bool = True) -> torch.Tensor:
    """Differentiable all-gather along dim 0: ``[t, ...] -> [cp · t, ...]`` in rank order
    (``reduce_grad``: see ``_AllGatherFirstDim``)."""
    return _AllGatherFirstDim.apply(local, group, reduce_grad)


def gather_from_cp(local: torch.Tensor, cu_seqlens: torch.Tensor | Sequence[int],
                   group, reduce_grad: bool = True) -> torch.Tensor:
    """The full pack from every rank's local tokens (differentiable): ``[T / cp, ...] -> [T, ...]``
    in global token order. ``cu_seqlens`` are the global (padded) boundaries.

    ``reduce_grad=True`` (K/V for attention, an encoder's output feeding different work on each
    rank): the backward sums every rank's gradient for this rank's rows. ``False`` (a per-token
    loss whose reduction runs identically on every rank): the backward keeps this rank's rows of
    its own gradient."""
    cp_size = dist.get_world_size(group) if group is not None else 1
    if cp_size == 1:
        return local
    gathered = all_gather_cp(local, group, reduce_grad)
    return gathered.index_select(0, _rank_major_to_global(cu_seqlens, cp_size, gathered.device))
