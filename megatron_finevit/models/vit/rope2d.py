"""2D rotary position embedding (Qwen2-VL style) as megatron per-token RoPE tables.

Each head's ``d`` channels form ``d / 2`` rotary pairs (channel ``j`` with ``j + d/2``, megatron's
non-interleaved ``rotate_half``). The pairs use ``d / 4`` frequencies
``θ^(-2k / (d/2))``, ``k = 0 .. d/4 − 1``, twice: pairs ``0 .. d/4 − 1`` rotate by
``row · freq_k``, pairs ``d/4 .. d/2 − 1`` by ``col · freq_k``, where (row, col) is the patch's
position in its own image's grid. So half the rotary frequencies follow the row index and half the
column, as in Qwen2-VL / Qwen2.5-VL's vision tower.

megatron applies RoPE inside ``Attention`` from a ``freqs`` table of angles; for THD input a
table with one row per packed token (``freqs.size(0) == cu_seqlens[-1]``) is used as given
(``rope_utils._apply_rotary_pos_emb_thd``), also under context parallelism, where megatron picks
this rank's rows itself. Rows of padding tokens are zero (no rotation).
"""

from __future__ import annotations

from typing import Sequence

import torch


def window_major_positions(grid_h: int, grid_w: int, merge_size: int = 2
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of every patch of a ``grid_h × grid_w`` image, in the merge-window-major order
    of ``patch_embed.image_to_patches``: two int64 ``[grid_h · grid_w]`` tensors."""
    m = merge_size
    rows = torch.arange(grid_h).view(grid_h // m, 1, m, 1).expand(-1, grid_w // m, -1, m)
    cols = torch.arange(grid_w).view(1, grid_w // m, 1, m).expand(grid_h // m, -1, m, -1)
    return rows.reshape(-1), cols.reshape(-1)


def rope_frequencies(head_dim: int, theta: float = 10_000.0) -> torch.Tensor:
    """The ``head_dim / 4`` inverse frequencies shared by the row and column halves (fp32)."""
    quarter = head_dim // 4
    return 1.0 / theta ** (torch.arange(quarter, dtype=torch.float64) * 2 / (head_dim // 2))


def image_rope_angles(grid_h: int, grid_w: int, head_dim: int, theta: float = 10_000.0,
                      merge_size: int = 2) -> torch.Tensor:
    """Rotation angles of one image's patches: ``[grid_h · grid_w, head_dim]`` fp32, laid out
    for megatron's non-interleaved RoPE (``cat(a, a)`` with ``a = [row · f, col · f]``)."""
    rows, cols = window_major_positions(grid_h, grid_w, merge_size)
    inv_freq = rope_frequencies(head_dim, theta)
    half = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=1)
    return torch.cat([half, half], dim=1).float()


def packed_rope_freqs(grids: torch.Tensor | Sequence[Sequence[int]], cu_seqlens: torch.Tensor,
                      head_dim: int, theta: float = 10_000.0, merge_size: int = 2,
                      cu_seqlens_padded: torch.Tensor | None = None) -> torch.Tensor:
    """megatron's RoPE ``freqs`` for a whole pack: ``[T, 1, 1, head_dim]`` fp32.

    Image ``i`` (grid ``grids[i]``) fills the first ``cu_seqlens[i+1] − cu_seqlens[i]`` rows of
    its segment, which starts at ``cu_seqlens_padded[i]`` (``cu_seqlens`` when not given) and
    the table has ``T = cu_seqlens_padded[-1]`` rows; rows of per-image padding and of segments
    beyond the last grid are zero.
    """
    grids = torch.as_tensor(grids, dtype=torch.long).tolist()
    padded = cu_seqlens if cu_seqlens_padded is None else cu_seqlens_padded
    starts, real = padded.tolist(), cu_seqlens.tolist()
    table = torch.zeros(starts[-1], head_dim)
    for i, (gh, gw) in enumerate(grids):
        length = real[i + 1] - real[i]
        if length != gh * gw:
            raise ValueError(f"segment {i} has {length} tokens but grid {gh}x{gw}")
        table[starts[i]:starts[i] + length] = image_rope_angles(gh, gw, head_dim, theta, merge_size)
    return table.view(-1, 1, 1, head_dim)
