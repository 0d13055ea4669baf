"""Native-resolution resize policy shared by every decoder (PIL, DALI) and the zarr index.

FineViT (paper §3.1) feeds images at native resolution and aspect ratio, "resized to the nearest
resolution with a multiple of 28×28 pixels" so that the 14-pixel patches can be merged 2×2 before
the LLM. `smart_resize` follows the Qwen2-VL rule:

1. round each side to the nearest multiple of `factor` (at least one `factor`);
2. if the area is above `max_pixels`, scale both sides down by the same factor and floor each to a
   multiple of `factor`; if below `min_pixels`, scale up and ceil each to a multiple of `factor`.

Everything is computed in exact integer arithmetic (no float sqrt): the result never depends on
float rounding, so the PIL decoder, the DALI decoder and the index agree bit for bit on sizes.

Defaults (paper, Table 2 / §4): `max_pixels = 1000*1000` ("images within 1000×1000" in Stage III
and the MLLM ablations); `max_aspect_ratio = 3.0` (curation keeps aspect ∈ [1/3, 3]);
`min_pixels = 56*56` (one 2×2 merge window of 28-pixel cells at the smallest). Per-stage budgets
are in `STAGE_MAX_PIXELS` (Stage I 256², Stage II 336² → 448², Stage III 1000²).
"""

from __future__ import annotations

import dataclasses
from math import isqrt

from megatron_finevit.data.bad_samples import BadSampleError

PATCH_SIZE = 14
MERGE_FACTOR = 28  # patch 14 × 2×2 merge
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 1000 * 1000
DEFAULT_MAX_ASPECT_RATIO = 3.0

# Max pixel budget per training stage (paper Table 2 "Resolution" row and §3.2).
STAGE_MAX_PIXELS = {
    "mim": 256 * 256,
    "contrastive_start": 336 * 336,
    "contrastive_end": 448 * 448,
    "align": 1000 * 1000,
    "sft": 1000 * 1000,
}


def _ceil_isqrt(n: int) -> int:
    """Smallest k >= 0 with k*k >= n."""
    k = isqrt(n)
    return k if k * k == n else k + 1


def smart_resize(height: int, width: int, factor: int = MERGE_FACTOR,
                 min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> tuple[int, int]:
    """Target (height, width) for an image of `height`×`width` pixels.

    Both returned sides are positive multiples of `factor` and `min_pixels <= h*w <= max_pixels`;
    the aspect ratio is kept up to the rounding of each side to a multiple of `factor`.

    Raises:
        BadSampleError("degenerate_size") if a side is < 2 pixels,
        BadSampleError("extreme_aspect_ratio") if max(h, w) / min(h, w) > max_aspect_ratio,
        ValueError for an inconsistent policy (bounds that no multiple of `factor` can meet).
    """
    if factor < 1 or min_pixels < 1 or max_pixels < factor * factor or min_pixels > max_pixels:
        raise ValueError(f"invalid resize policy: factor={factor} min_pixels={min_pixels} "
                         f"max_pixels={max_pixels} (need max_pixels >= factor² >= 1 and "
                         "min_pixels <= max_pixels)")
    height, width = int(height), int(width)
    if height < 2 or width < 2:
        raise BadSampleError("degenerate_size", f"image is {height}x{width} pixels")
    if max(height, width) > max_aspect_ratio * min(height, width):
        aspect = max(height, width) / min(height, width)
        raise BadSampleError("extreme_aspect_ratio",
                             f"{height}x{width} has aspect {aspect:.2f} > {max_aspect_ratio}")

    # Round half up: (2n + f) // (2f) == floor(n/f + 1/2).
    h_bar = max(factor, (2 * height + factor) // (2 * factor) * factor)
    w_bar = max(factor, (2 * width + factor) // (2 * factor) * factor)
    f2 = factor * factor
    if h_bar * w_bar > max_pixels:
        # Largest k with k*f <= h*sqrt(M/(h*w))  <=>  k² <= h*M / (f² * w).
        h_bar = max(1, isqrt(height * max_pixels // (f2 * width))) * factor
        w_bar = max(1, isqrt(width * max_pixels // (f2 * height))) * factor
    elif h_bar * w_bar < min_pixels:
        # Smallest k with k*f >= h*sqrt(m/(h*w))  <=>  k² >= h*m / (f² * w).
        h_bar = _ceil_isqrt(-(-height * min_pixels // (f2 * width))) * factor
        w_bar = _ceil_isqrt(-(-width * min_pixels // (f2 * height))) * factor
    if not min_pixels <= h_bar * w_bar <= max_pixels:
        # Only reachable when the bounds are too close together for this aspect ratio.
        raise ValueError(f"resize policy cannot fit {height}x{width}: got {h_bar}x{w_bar}, bounds "
                         f"[{min_pixels}, {max_pixels}] are too tight for factor {factor}")
    return h_bar, w_bar


def num_patches(height: int, width: int, patch_size: int = PATCH_SIZE) -> int:
    """Number of `patch_size`² patches of an already resized image (sides must be multiples)."""
    if height % patch_size or width % patch_size:
        raise ValueError(f"{height}x{width} is not a multiple of patch size {patch_size}; "
                         "apply smart_resize first")
    return (height // patch_size) * (width // patch_size)


@dataclasses.dataclass(frozen=True)
class ResizePolicy:
    """The resize parameters as one value: passed to decoders and recorded in the zarr index."""

    factor: int = MERGE_FACTOR
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
    patch_size: int = PATCH_SIZE

    def __post_init__(self):
        if self.factor % self.patch_size:
            raise ValueError(f"factor {self.factor} must be a multiple of patch_size "
                             f"{self.patch_size}")

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels,
                            self.max_aspect_ratio)

    def num_patches(self, height: int, width: int) -> int:
        """Patch tokens of an original `height`×`width` image after resizing."""
        return num_patches(*self.target_size(height, width), patch_size=self.patch_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
