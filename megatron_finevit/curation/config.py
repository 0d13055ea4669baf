"""All curation thresholds in one dataclass, with the paper's values as defaults.

Paper (FineViT §3.3, Appendix A, Table 9):
  Stage I/II:  short side >= 224, pHash de-duplication.
  Stage III:   short side >= 448, aspect ratio in [1/3, 3], blurry / too dark / too bright /
               over-saturated images rejected (~3%); regions: confidence >= 0.3, area >= 1% of the
               image, class-agnostic NMS at IoU 0.7, class-balanced sampling (classes with
               < 1,000 boxes kept whole, at most 100,000 per class per 10M-image window);
               OCR boxes replace "text" regions.

The paper gives no numbers for the blur / brightness / saturation rules; the defaults below were
calibrated on real photos (see `quality.py` for the measurements behind them).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

import yaml


@dataclass
class CurationConfig:
    """Thresholds of every curation rule; `for_stage(stage)` gives the paper's per-stage presets."""

    stage: int = 3

    # --- image geometry (sizes in pixels of the stored image) ---
    min_short_side: int = 448
    check_aspect: bool = True
    min_aspect: float = 1 / 3  # width / height
    max_aspect: float = 3.0

    # --- de-duplication (perceptual hash) ---
    dedup: bool = True
    phash_size: int = 8  # the hash has phash_size**2 bits
    # Hamming distance <= this counts as a duplicate. Measured on real photos (64-bit hash):
    # resized / JPEG-recompressed copies 0-6, different photos >= 20.
    phash_max_distance: int = 8

    # --- image quality (measured on a grey copy downscaled to quality_max_side) ---
    check_quality: bool = True
    quality_max_side: int = 512
    min_sharpness: float = 15.0  # variance of the 4-neighbour Laplacian, grey levels 0-255
    min_brightness: float = 0.06  # mean luma in [0, 1]
    max_brightness: float = 0.94
    max_saturation: float = 0.80  # mean HSV saturation in [0, 1]

    # --- regions ---
    curate_regions: bool = True
    min_region_score: float = 0.3
    min_region_area: float = 0.01  # fraction of the image area
    nms_iou: float = 0.7  # a box overlapping a higher-scored kept box by IoU > this is dropped
    # Regions whose label or caption is one of these are dropped: the sample's OCR boxes
    # (field "ocr") carry the text instead (the paper replaces them with PaddleOCR output).
    text_labels: tuple[str, ...] = ("text",)
    keep_whole_below: int = 1000
    cap_per_class: int = 100_000
    window_images: int = 10_000_000
    seed: int = 0

    # --- outputs ---
    num_visualized: int = 4  # images drawn into regions.png
    max_regions_drawn: int = 8  # regions drawn per image (random subset, as the paper's Fig. 11)

    @classmethod
    def for_stage(cls, stage: int, **overrides) -> "CurationConfig":
        """The paper's rules for data of stage 1, 2 or 3, with optional field overrides."""
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
        preset = {} if stage == 3 else dict(min_short_side=224, check_aspect=False,
                                             check_quality=False, curate_regions=False)
        cfg = cls(stage=stage, **{**preset, **overrides})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent threshold."""
        checks = [
            (self.min_short_side >= 1, "min_short_side must be >= 1"),
            (0 < self.min_aspect <= self.max_aspect, "need 0 < min_aspect <= max_aspect"),
            (self.phash_size >= 2, "phash_size must be >= 2"),
            (0 <= self.phash_max_distance < self.phash_size ** 2,
             "phash_max_distance must be in [0, phash_size**2)"),
            (self.quality_max_side >= 16, "quality_max_side must be >= 16"),
            (self.min_sharpness >= 0, "min_sharpness must be >= 0"),
            (0 <= self.min_brightness < self.max_brightness <= 1,
             "need 0 <= min_brightness < max_brightness <= 1"),
            (0 <= self.max_saturation <= 1, "max_saturation must be in [0, 1]"),
            (0 <= self.min_region_area <= 1, "min_region_area must be in [0, 1]"),
            (0 <= self.nms_iou <= 1, "nms_iou must be in [0, 1]"),
            (self.keep_whole_below >= 0, "keep_whole_below must be >= 0"),
            (self.cap_per_class >= self.keep_whole_below,
             "cap_per_class must be >= keep_whole_below"),
            (self.window_images >= 1, "window_images must be >= 1"),
            (self.num_visualized >= 0 and self.max_regions_drawn >= 0,
             "num_visualized and max_regions_drawn must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid curation config: {message} ({self})")


def apply_overrides(cfg: CurationConfig, overrides: list[str]) -> CurationConfig:
    """Return a copy of `cfg` with `key=value` overrides applied (values parsed as YAML scalars).

    A tuple field takes a comma-separated list: `text_labels=text,sign`.
    """
    hints = typing.get_type_hints(CurationConfig)
    changes = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(CurationConfig))
            raise ValueError(f"bad curation override {item!r}: expected key=value with key in "
                             f"{known}")
        if key == "stage":
            raise ValueError("the stage picks a preset: use CurationConfig.for_stage / --stage")
        changes[key] = _parse_value(key, raw, hints[key])
    out = dataclasses.replace(cfg, **changes)
    out.validate()
    return out


def _parse_value(key: str, raw: str, hint) -> object:
    if typing.get_origin(hint) is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    value = yaml.safe_load(raw)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is float and isinstance(value, str):  # "1/3"
        num, slash, den = value.partition("/")
        if slash:
            value = float(num) / float(den)
    if type(value) is not hint:
        raise ValueError(f"curation override {key}={raw!r}: expected {hint.__name__}, "
                         f"got {type(value).__name__}")
    return value
