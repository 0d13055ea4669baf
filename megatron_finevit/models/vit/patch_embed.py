"""Native-resolution images -> packed patch rows, and the patch embedding.

Patch order is **merge-window-major** (Qwen2-VL's): the patch grid is cut into 2×2 merge windows,
windows are taken row by row, and the 4 patches of a window are consecutive (top-left, top-right,
bottom-left, bottom-right). The projector's 2×2 merge is then a reshape of 4 consecutive tokens,
and a window never straddles two images. Each patch row is the ``[C, 14, 14]`` pixel block
flattened channel-major, i.e. the layout of a ``Conv2d(C, hidden, 14, stride=14)`` weight, so
``PatchEmbedding``'s Linear is exactly that convolution.

Packing (THD): several images become one ``[T, C·14·14]`` sequence with ``cu_seqlens`` (int32,
image ``i`` owns rows ``cu_seqlens[i] : cu_seqlens[i+1]``) and per-image patch grids ``(h, w)``.
Segments after the last grid are padding (the data pipeline's convention: a pack's padding tail
is its own segment).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from megatron.core.transformer.module import MegatronModule


def check_image_size(height: int, width: int, side_multiple: int = 28) -> None:
    """Raise ValueError unless both sides are positive multiples of ``side_multiple``."""
    if height <= 0 or width <= 0 or height % side_multiple or width % side_multiple:
        raise ValueError(
            f"image of {height}x{width} pixels: both sides must be positive multiples of "
            f"{side_multiple} (patch 14 x 2x2 merge); resize it with "
            f"megatron_finevit.data.resize.smart_resize first")


def image_to_patches(image: torch.Tensor, patch_size: int = 14, merge_size: int = 2
                     ) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image ``[C, H, W]`` -> patches ``[H/p · W/p, C·p·p]`` in merge-window-major order,
    and its patch grid ``(H/p, W/p)``."""
    grid = patch_grid(image, patch_size, merge_size)
    out = image.new_empty(grid[0] * grid[1], image.shape[0] * patch_size * patch_size)
    write_patches(out, image, patch_size, merge_size)
    return out, grid


def patch_grid(image: torch.Tensor, patch_size: int = 14, merge_size: int = 2
               ) -> tuple[int, int]:
    """The patch grid ``(H/p, W/p)`` of an image ``[C, H, W]`` (sides checked)."""
    if image.dim() != 3:
        raise ValueError(f"expected an image [C, H, W], got shape {tuple(image.shape)}")
    _, height, width = image.shape
    check_image_size(height, width, patch_size * merge_size)
    return height // patch_size, width // patch_size


def write_patches(out: torch.Tensor, image: torch.Tensor, patch_size: int, merge_size: int
                  ) -> None:
    """Write an image ``[C, H, W]``'s patches into ``out`` ``[H/p · W/p, C·p·p]`` in one strided
    copy (the loader's hot path: no intermediate tensor per image)."""
    c, height, width = image.shape
    gh, gw, m, p = height // patch_size, width // patch_size, merge_size, patch_size
    # [C, H, W] -> [C, gh/m, m, p, gw/m, m, p] -> [gh/m, gw/m, m(row), m(col), C, p, p]
    shape, order = (c, gh // m, m, p, gw // m, m, p), (1, 4, 2, 5, 0, 3, 6)
    target = (gh // m, gw // m, m, m, c, p, p)
    if _numpy_copy_applies(out, image):
        # numpy's single-threaded strided copy is 2-3x faster here than torch's, whose
        # intra-op threads also compete with the decode threads of the loader
        np.copyto(out.numpy().reshape(target), image.numpy().reshape(shape).transpose(order))
        return
    out.view(target).copy_(image.reshape(shape).permute(order))


def _empty_like_pack(image: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """An uninitialised ``[rows, columns]`` tensor of ``image``'s dtype and device. On CPU from
    numpy: glibc keeps a freed pack's pages for the next one, where torch's allocator maps fresh
    ones that fault in on the first write (0.8 vs 0.2 ms a 4,096-row pack, measured here)."""
    if image.device.type == "cpu" and image.dtype in _NUMPY_DTYPES:
        return torch.from_numpy(np.empty((rows, columns), dtype=_NUMPY_DTYPES[image.dtype]))
    return image.new_empty(rows, columns)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64,
                 torch.float16: np.float16, torch.uint8: np.uint8}


def _numpy_copy_applies(out: torch.Tensor, image: torch.Tensor) -> bool:
    return (out.device.type == image.device.type == "cpu" and out.dtype == image.dtype
            and out.dtype in _NUMPY_DTYPES
            and not (out.requires_grad or image.requires_grad) and out.is_contiguous())


@dataclass
class PackedImages:
    """A THD pack of images.

    patches: ``[T, C·p·p]`` rows of every image back to back (then any padding rows).
    cu_seqlens: int32 ``[k + 1]`` segment boundaries, ``k >= n``; segments ``n..k-1`` are padding.
    grids: int64 ``[n, 2]`` patch rows and columns of each image (``h · w`` = its segment length).
    """

    patches: torch.Tensor
    cu_seqlens: torch.Tensor
    grids: torch.Tensor

    def __post_init__(self):
        bounds = self.cu_seqlens.tolist()
        n = self.grids.shape[0]
        if self.cu_seqlens.dtype != torch.int32 or bounds[0] != 0 or bounds[-1] != len(self.patches):
            raise ValueError(f"cu_seqlens must be int32 from 0 to {len(self.patches)}, got {bounds}")
        if len(bounds) < n + 1:
            raise ValueError(f"{n} grids but only {len(bounds) - 1} segments")
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        sizes = (self.grids[:, 0] * self.grids[:, 1]).tolist()
        if lengths[:n] != sizes:
            raise ValueError(f"image segments of {lengths[:n]} tokens do not match grids {sizes}")

    @property
    def num_images(self) -> int:
        return self.grids.shape[0]

    @property
    def image_lengths(self) -> list[int]:
        return (self.grids[:, 0] * self.grids[:, 1]).tolist()


def pack_images(images: Sequence[torch.Tensor], patch_size: int = 14, merge_size: int = 2,
                pad_to: int | None = None) -> PackedImages:
    """Images ``[C, H_i, W_i]`` of any sizes (multiples of 28) -> one ``PackedImages``;
    ``pad_to`` appends a zero padding segment up to that many tokens (a fixed-size pack)."""
    if not images:
        raise ValueError("pack_images needs at least one image")
    grids = [patch_grid(img, patch_size, merge_size) for img in images]
    lengths = [h * w for h, w in grids]
    total = sum(lengths)
    if pad_to is not None and pad_to < total:
        raise ValueError(f"{total} patches do not fit pad_to={pad_to}")
    rows = total if pad_to is None else pad_to
    # one preallocated pack, each image written into its rows: no per-image tensors, no cat
    patches = _empty_like_pack(images[0], rows, images[0].shape[0] * patch_size * patch_size)
    start = 0
    for image, length in zip(images, lengths):
        write_patches(patches[start:start + length], image, patch_size, merge_size)
        start += length
    if rows > total:
        lengths.append(rows - total)
        if _numpy_copy_applies(patches, patches):
            patches.numpy()[total:] = 0  # single-threaded, as write_patches
        else:
            patches[total:].zero_()
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(lengths).cumsum(0)
    return PackedImages(patches, cu_seqlens, torch.tensor(grids, dtype=torch.long))


class PatchEmbedding(MegatronModule):
    """Linear ``C·p·p -> hidden`` (no bias, as Qwen2-VL's patch convolution): ``[t, C·p·p] ->
    [t, 1, hidden]``.

    Replicated across tensor-parallel ranks rather than column-parallel: it holds 0.1% of the
    encoder's parameters, and a split would only add an all-gather before the first layer. Under
    sequence parallelism each TP rank embeds only its own slice of the tokens, so the weight is
    tagged ``sequence_parallel`` and megatron all-reduces its gradient over the TP group.
    """

    def __init__(self, config, patch_dim: int):
        super().__init__(config=config)
        self.proj = torch.nn.Linear(patch_dim, config.hidden_size, bias=False,
                                    dtype=config.params_dtype)
        if config.perform_initialization:
            config.init_method(self.proj.weight)
        self.proj.weight.sequence_parallel = config.sequence_parallel

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches.to(self.proj.weight.dtype)).unsqueeze(1)
