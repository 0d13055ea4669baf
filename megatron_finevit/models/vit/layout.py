"""The encoder's input layout: a pack of images -> this rank's rows, segment boundaries and the
map back.

``prepare_encoder_input`` is the one place where a ``PackedImages`` meets the parallel layout:

- **context parallelism** (``cp > 1``): every image segment is padded to a multiple of ``2·cp``
  and each CP rank keeps chunks ``r`` and ``2·cp − 1 − r`` of every segment (the layout of
  ``models.attention.context_parallel``; megatron's THD RoPE uses the same);
- **sequence parallelism**: the per-rank token count must split evenly over the TP group;
- **fixed pack size** (``total_tokens``): pipeline p2p needs the same shape every micro-batch.

The padding needed for these goes into the image segments' tails (CP) and one trailing padding
segment, which attends only to itself and holds no real tokens. The returned ``EncoderInput``
carries what ``FineViTModel.forward`` takes (global ``cu_seqlens`` of real tokens, padded
boundaries, grids, and this rank's patch rows), plus the index maps that move per-token data
(MIM masks, teacher targets) into the layout and the encoder's output back to pack order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_finevit.models.attention import (
    cp_padded_length,
    cp_partition_index,
    gather_from_cp,
)
from megatron_finevit.models.vit.patch_embed import PackedImages


@dataclass
class EncoderInput:
    """One pack laid out for one (CP rank, TP group).

    patches: ``[t, C·p·p]`` this CP rank's rows of the padded pack (``t = T / cp``; zeros at
        padding). Under sequence parallelism the model splits them further over TP itself.
    cu_seqlens: int32 ``[m + 1]`` global boundaries counting real tokens only (the trailing
        padding segment, if any, has length 0).
    cu_seqlens_padded: int32 ``[m + 1]`` global boundaries of the padded pack (``T`` rows), or
        ``None`` when nothing was padded.
    grids: int64 ``[n, 2]`` patch grid of each image (segments ``0 .. n − 1``).
    source_index: int64 ``[T]`` row of the input pack each padded row came from, −1 for padding.
    local_index: int64 ``[t]`` padded-pack rows this CP rank holds, in local order.
    """

    patches: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_seqlens_padded: torch.Tensor | None
    grids: torch.Tensor
    source_index: torch.Tensor
    local_index: torch.Tensor
    cp_size: int = 1

    @property
    def padded_bounds(self) -> torch.Tensor:
        return self.cu_seqlens if self.cu_seqlens_padded is None else self.cu_seqlens_padded

    @property
    def total_tokens(self) -> int:
        """Rows of the padded pack across all CP ranks (megatron's ``seq_length``)."""
        return int(self.padded_bounds[-1])

    def model_inputs(self) -> dict:
        """Keyword arguments of ``FineViTModel.forward`` (add ``masked=`` for MIM)."""
        return {"patches": self.patches, "cu_seqlens": self.cu_seqlens, "grids": self.grids,
                "cu_seqlens_padded": self.cu_seqlens_padded}

    def to_local(self, per_token: torch.Tensor, fill=0) -> torch.Tensor:
        """Per-token data of the input pack's real tokens ``[N, ...]`` (``N`` = image tokens)
        -> this rank's rows ``[t, ...]``, ``fill`` at padding."""
        source = self.source_index[self.local_index].to(per_token.device)
        out = per_token[source.clamp(min=0)]
        pad = (source < 0).view(-1, *([1] * (per_token.dim() - 1)))
        return out.masked_fill(pad, fill)

    def gather_output(self, hidden: torch.Tensor,
                      cp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """The encoder's output on this CP rank ``[t, 1, h]`` -> the real image tokens of the
        whole pack ``[N, h]`` in input pack order (differentiable; undoes CP, drops padding).

        Loss scaling under CP: megatron's schedule multiplies each last-stage loss by the CP size
        (it expects a loss over this rank's own tokens) and DDP averages gradients over DP×CP.
        A loss computed from this gathered output is the same on every CP rank, so divide it by
        the CP size (``cp_loss_scale``); the backward of the gather sums the CP ranks' gradients
        for each rank's rows, which makes the encoder's gradients come out exact.
        """
        full = gather_from_cp(hidden.squeeze(1), self.padded_bounds, cp_group)
        real = torch.nonzero(self.source_index >= 0).squeeze(1).to(hidden.device)
        return full.index_select(0, real)

    @property
    def cp_loss_scale(self) -> float:
        """Factor for a loss computed on ``gather_output`` (see there): ``1 / cp``."""
        return 1.0 / self.cp_size


def prepare_encoder_input(packed: PackedImages, cp_size: int = 1, cp_rank: int = 0,
                          sp_size: int = 1, total_tokens: int | None = None) -> EncoderInput:
    """Lay ``packed`` out for CP rank ``cp_rank`` of ``cp_size``, with ``sp_size`` TP ranks
    sharing the sequence (1 without sequence parallelism).

    ``total_tokens`` fixes the padded pack size (raise if the images do not fit); by default it is
    the smallest valid size that keeps at least the input's own padding rows.
    """
    if not 0 <= cp_rank < cp_size or sp_size < 1:
        raise ValueError(f"invalid layout cp_rank={cp_rank}, cp_size={cp_size}, sp_size={sp_size}")
    lengths = packed.image_lengths
    padded = [cp_padded_length(n, cp_size) for n in lengths]
    segment_multiple = 2 * cp_size if cp_size > 1 else 1
    multiple = math.lcm(segment_multiple, cp_size * sp_size)
    body = sum(padded)
    input_padding = len(packed.patches) - sum(lengths)
    if total_tokens is None:
        total_tokens = -(-(body + input_padding) // multiple) * multiple
    elif total_tokens < body or total_tokens % multiple:
        raise ValueError(
            f"total_tokens={total_tokens} must be >= {body} (the images padded for CP) and a "
            f"multiple of {multiple} (2·cp and cp·sp for cp={cp_size}, sp={sp_size})")
    tail = total_tokens - body

    real_lengths, padded_lengths = list(lengths), list(padded)
    if tail:
        real_lengths.append(0), padded_lengths.append(tail)
    cu_seqlens = _cumulative(real_lengths)
    cu_padded = _cumulative(padded_lengths)

    source_index = torch.full((total_tokens,), -1, dtype=torch.long)
    real_starts, pad_starts = cu_seqlens.tolist(), cu_padded.tolist()
    for i, n in enumerate(lengths):
        source_index[pad_starts[i]:pad_starts[i] + n] = torch.arange(real_starts[i],
                                                                     real_starts[i] + n)
    local_index = cp_partition_index(cu_padded, cp_size, cp_rank)
    source = source_index[local_index]
    patches = packed.patches[source.clamp(min=0)].masked_fill((source < 0)[:, None], 0)
    return EncoderInput(
        patches=patches,
        cu_seqlens=cu_seqlens,
        cu_seqlens_padded=None if torch.equal(cu_seqlens, cu_padded) else cu_padded,
        grids=packed.grids,
        source_index=source_index,
        local_index=local_index,
        cp_size=cp_size,
    )


def _cumulative(lengths: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
    return cu
