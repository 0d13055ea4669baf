"""Random patch masks for Stage I masked image modelling (paper §3.2: 75% of patches masked).

Masks are drawn per image inside a pack: image i with n_i patches gets exactly
round(ratio · n_i) masked patches (round half up), chosen uniformly among all subsets of that
size, independently of the other images. The draw uses only the given `torch.Generator`, so a
seeded generator reproduces the mask exactly.

Merge-window masking is optional: with `unit=4` the masked subsets are whole 2×2 merge windows
(our patch order is merge-window-major, so a window is 4 consecutive tokens); then
round(ratio · n_i / 4) windows are masked. The paper does not say which one it uses; per-patch
(`unit=1`) is the default.
"""

from __future__ import annotations

from typing import Sequence

import torch


def random_patch_mask(num_patches_per_image: Sequence[int], ratio: float = 0.75,
                      generator: torch.Generator | None = None, unit: int = 1) -> torch.Tensor:
    """Boolean mask over the patches of a pack, True = masked.

    Args:
        num_patches_per_image: patch count n_i of each image, in pack order.
        ratio: fraction of each image's patches to mask, in [0, 1].
        generator: source of randomness (seed it for reproducible masks).
        unit: patches masked together (1 = single patches, 4 = 2×2 merge windows laid out as 4
            consecutive tokens); must divide every n_i.

    Returns:
        `[sum(n_i)]` bool tensor; image i's patches hold exactly unit · round(ratio · n_i / unit)
        True values.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    counts = torch.as_tensor(list(num_patches_per_image), dtype=torch.int64)
    if unit < 1 or (counts % unit).any() or (counts < 0).any():
        raise ValueError(f"patch counts {counts.tolist()} must be non-negative multiples of "
                         f"unit={unit}")
    units = counts // unit
    masked_units = torch.floor(units.double() * ratio + 0.5).long()

    # Rank each unit within its image by a random score: sort by score, then stably by image,
    # so every image's units come out in random order; the first `masked_units` are masked.
    image_of_unit = torch.repeat_interleave(torch.arange(len(units)), units)
    scores = torch.rand(len(image_of_unit), generator=generator, dtype=torch.float64)
    by_score = torch.argsort(scores)
    order = by_score[torch.sort(image_of_unit[by_score], stable=True).indices]
    first_unit = torch.cumsum(units, 0) - units
    rank_in_image = torch.arange(len(order)) - first_unit[image_of_unit]
    unit_mask = torch.empty(len(order), dtype=torch.bool)
    unit_mask[order] = rank_in_image < masked_units[image_of_unit]
    return unit_mask.repeat_interleave(unit)
