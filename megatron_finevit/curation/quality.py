"""Image quality measures and rules: blur, too dark, too bright, over-saturated.

All measures are taken on a copy downscaled so its longer side is at most `max_side` pixels
(bilinear), which makes them cheap and roughly independent of the stored resolution:

- sharpness: variance of the 4-neighbour Laplacian of the grey image (levels 0-255). Focus blur
  and motion blur remove the high frequencies the Laplacian responds to.
- brightness: mean grey level in [0, 1] (PIL's ITU-R 601 luma).
- saturation: mean of the HSV S channel in [0, 1].

Calibration of the defaults (`CurationConfig`), measured with max_side=512 on 16 real photos
shipped by scikit-image and matplotlib (astronaut, coffee, chelsea, rocket, camera, coins, clock,
hubble_deep_field, immunohistochemistry, retina, moon, brick, grass, gravel, stereo_motorcycle,
grace_hopper), on degraded copies of them, and on 400 random crops (the tests rebuild all three):
- sharpness: originals 24 (clock) .. 5,295 (grass); crops: 1st percentile 14, 3rd 25; Gaussian
  blur with radius = longer side / 150 ("out of focus"): 0.9 .. 5.4  -> min_sharpness 15.
- brightness: originals 0.076 (hubble_deep_field, a night sky) .. 0.64; exposure x0.08:
  0.006 .. 0.051 -> min_brightness 0.06; blown out, 255 - (255 - x) x0.05: 0.954 .. 0.981 ->
  max_brightness 0.94, which leaves room for white-background photos.
- saturation: originals up to 0.758 (retina), crops up to 0.797 (coffee); colour enhanced x4:
  0.87 .. 0.99 for the colourful photos (coffee, chelsea, rocket, retina) -> max_saturation 0.80.
  The mean only moves that far where colour covers most of the frame: the astronaut (large
  white suit) goes from 0.36 to 0.57 and is not caught.
With these defaults 5 of the 400 crops (1.25%) are rejected, all as blurry, all from the
soft-focus retina photo; web data holds more degraded images, for which the paper reports ~3%.

The rules are checked in a fixed order and the first that fails names the rejection:
too_dark, too_bright, oversaturated, blurry. Exposure goes first because scaling the grey levels
by a factor f scales the Laplacian variance by f**2: a dark or washed-out photo would otherwise be
reported as blurry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

QUALITY_RULES = ("too_dark", "too_bright", "oversaturated", "blurry")


@dataclass(frozen=True)
class QualityStats:
    sharpness: float  # variance of the Laplacian, grey levels 0-255
    brightness: float  # mean luma in [0, 1]
    saturation: float  # mean HSV saturation in [0, 1]


def laplacian_variance(grey: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior pixels. `grey [h, w]` float."""
    if grey.shape[0] < 3 or grey.shape[1] < 3:
        return 0.0
    lap = (grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:]
           - 4.0 * grey[1:-1, 1:-1])
    return float(lap.var(dtype=np.float64))


def measure_quality(image: Image.Image, max_side: int = 512) -> QualityStats:
    """Sharpness, brightness and saturation of `image` (any PIL mode)."""
    small = image.convert("RGB")
    if max(small.size) > max_side:
        scale = max_side / max(small.size)
        size = (max(1, round(small.width * scale)), max(1, round(small.height * scale)))
        small = small.resize(size, Image.BILINEAR)
    grey = np.asarray(small.convert("L"), dtype=np.float32)
    saturation = np.asarray(small.convert("HSV"), dtype=np.float32)[..., 1]
    return QualityStats(sharpness=laplacian_variance(grey),
                        brightness=float(grey.mean(dtype=np.float64)) / 255.0,
                        saturation=float(saturation.mean(dtype=np.float64)) / 255.0)


def quality_rejection(stats: QualityStats, min_sharpness: float, min_brightness: float,
                      max_brightness: float, max_saturation: float) -> str | None:
    """Name of the first failed rule (see QUALITY_RULES), or None if the image passes."""
    if stats.brightness < min_brightness:
        return "too_dark"
    if stats.brightness > max_brightness:
        return "too_bright"
    if stats.saturation > max_saturation:
        return "oversaturated"
    if stats.sharpness < min_sharpness:
        return "blurry"
    return None
