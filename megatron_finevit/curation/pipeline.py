"""Runs the curation rules over a stream of samples and counts what each rule removes.

Image rules, in order (the first that fails names the rejection; cheap header checks first):
  corrupt_image       the image header does not parse, or (for images that pass the size rules,
                      the only ones whose pixels are decoded) the pixel data is broken
  meta_size_mismatch  the decoded size differs from the JSON width/height (boxes would be wrong)
  short_side          min(width, height) < min_short_side
  aspect              width / height outside [min_aspect, max_aspect]           (if check_aspect)
  too_dark, too_bright, oversaturated, blurry   see quality.py                 (if check_quality)
  duplicate           pHash within phash_max_distance of an already kept image  (if dedup)
De-duplication goes last so that the hash index holds kept images only: an image is removed as a
duplicate only when a near-copy of it is in the output.

A kept image then has its regions curated (if curate_regions; see regions.py): the per-image
rules and the class balancer, which sees kept images in stream order. An image whose regions are
all dropped is still kept (its global caption and OCR boxes remain useful).

Invariants, checked by the tests: images_in = images_kept + sum(images_rejected), and
regions_in (of kept images) = regions_kept + sum(regions_dropped).
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import asdict, dataclass

from PIL import Image

from megatron_finevit.curation.config import CurationConfig
from megatron_finevit.curation.phash import PHashDeduplicator, phash_bits
from megatron_finevit.curation.quality import QUALITY_RULES, measure_quality, quality_rejection
from megatron_finevit.curation.regions import (REGION_RULES, ClassBalancer, filter_regions,
                                               region_class)

IMAGE_RULES = ("corrupt_image", "meta_size_mismatch", "short_side", "aspect", *QUALITY_RULES,
               "duplicate")


@dataclass
class Decision:
    """Outcome for one sample: `rejected_by` is None when kept; `meta` has the curated regions."""
    rejected_by: str | None
    meta: dict
    image: Image.Image | None = None  # the decoded image (kept samples), e.g. for visualisation

    @property
    def kept(self) -> bool:
        return self.rejected_by is None


class Curator:
    """Applies `CurationConfig`'s rules to samples one at a time, in stream order."""

    def __init__(self, cfg: CurationConfig):
        cfg.validate()
        self.cfg = cfg
        self.images_in = 0
        self.images_rejected: Counter = Counter()
        self.regions_in = 0
        self.regions_dropped: Counter = Counter()
        self.regions_kept = 0
        self.ocr_boxes_kept = 0
        self._dedup = (PHashDeduplicator(cfg.phash_max_distance, cfg.phash_size ** 2)
                       if cfg.dedup else None)
        self._balancer = (ClassBalancer(cfg.keep_whole_below, cfg.cap_per_class,
                                        cfg.window_images, cfg.seed)
                          if cfg.curate_regions else None)

    @property
    def images_kept(self) -> int:
        return self.images_in - sum(self.images_rejected.values())

    def __call__(self, image_bytes: bytes, meta: dict) -> Decision:
        """Curate one sample (`meta` in the shard JSON schema; it is not modified)."""
        self.images_in += 1
        image, rule = self._image_rejection(image_bytes, meta)
        if rule is not None:
            self.images_rejected[rule] += 1
            return Decision(rule, meta)
        meta = dict(meta)
        self.regions_in += len(meta.get("regions", []))
        if self._balancer is not None:
            meta["regions"] = self._curate_regions(meta.get("regions", []), image.width,
                                                   image.height)
        self.regions_kept += len(meta.get("regions", []))
        self.ocr_boxes_kept += len(meta.get("ocr", []))
        return Decision(None, meta, image)

    def _image_rejection(self, image_bytes: bytes, meta: dict
                         ) -> tuple[Image.Image | None, str | None]:
        cfg = self.cfg
        try:
            image = Image.open(io.BytesIO(image_bytes))  # reads the header only
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None, "corrupt_image"
        width, height = image.size
        if (meta.get("width"), meta.get("height")) != (width, height):
            return None, "meta_size_mismatch"
        if min(width, height) < cfg.min_short_side:
            return None, "short_side"
        if cfg.check_aspect and not cfg.min_aspect <= width / height <= cfg.max_aspect:
            return None, "aspect"
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None, "corrupt_image"
        if cfg.check_quality:
            stats = measure_quality(image, cfg.quality_max_side)
            rule = quality_rejection(stats, cfg.min_sharpness, cfg.min_brightness,
                                     cfg.max_brightness, cfg.max_saturation)
            if rule is not None:
                return None, rule
        if self._dedup is not None and self._dedup.check_and_add(phash_bits(image, cfg.phash_size)):
            return None, "duplicate"
        return image, None

    def _curate_regions(self, regions: list[dict], width: int, height: int) -> list[dict]:
        cfg = self.cfg
        kept, dropped = filter_regions(regions, width, height, min_score=cfg.min_region_score,
                                       min_area=cfg.min_region_area, iou_threshold=cfg.nms_iou,
                                       text_labels=cfg.text_labels)
        self.regions_dropped.update(dropped)
        decisions = self._balancer.select([region_class(r) for r in kept])
        self.regions_dropped["class_balance"] += decisions.count(False)
        return [r for r, keep in zip(kept, decisions) if keep]

    def report(self) -> dict:
        """Counts per rule (every rule listed, zeros included) and the configuration used."""
        return {
            "config": asdict(self.cfg),
            "images": {"in": self.images_in, "kept": self.images_kept,
                       "rejected": {rule: self.images_rejected[rule] for rule in IMAGE_RULES}},
            "regions": {"in": self.regions_in, "kept": self.regions_kept,
                        "dropped": {rule: self.regions_dropped[rule] for rule in REGION_RULES}},
            "ocr_boxes_kept": self.ocr_boxes_kept,
        }


def format_report(report: dict) -> str:
    """Human-readable table of a `Curator.report()` (plus optional "bad_samples")."""
    lines = [f"curation report (stage {report['config']['stage']})", ""]
    for section, verb in (("images", "rejected"), ("regions", "dropped")):
        counts = report[section]
        total = max(counts["in"], 1)
        lines.append(f"{section}: {counts['in']} in, {counts['kept']} kept "
                     f"({100 * counts['kept'] / total:.1f}%)")
        for rule, n in counts[verb].items():
            lines.append(f"  {verb} by {rule:<20s} {n:>10d}  ({100 * n / total:5.1f}%)")
        lines.append("")
    lines.append(f"OCR boxes kept: {report['ocr_boxes_kept']}")
    if "bad_samples" in report:
        bad = report["bad_samples"]
        lines.append(f"unreadable samples skipped before curation: {bad['skipped']} "
                     f"{bad['skipped_by_reason']}; dropped items: {bad['dropped_by_reason']}")
    return "\n".join(lines) + "\n"
