"""Region (grounded box) curation: text regions, confidence, area, NMS, class balance.

Per image, in this order (the first rule that drops a region names it in the counts):
  text_region   label or caption is "text" (configurable): the OCR boxes of the sample (field
                "ocr") carry the text instead; the paper replaces such regions with PaddleOCR.
  low_score     detector confidence < min_score (a region without "score" is an annotation and
                counts as 1.0; a non-numeric score counts as -inf).
  small_area    box area (clipped to the image) < min_area of the image area.
  nms           class-agnostic NMS: IoU > iou_threshold with a higher-scored kept box.
Then across images, `ClassBalancer` caps frequent classes per window of images
(rule name `class_balance`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from megatron_finevit.curation.boxes import area_fraction, nms

REGION_RULES = ("text_region", "low_score", "small_area", "nms", "class_balance")


def _normalise(text) -> str:
    return " ".join(str(text).lower().split())


def region_class(region: dict) -> str:
    """The class a region is balanced under: its detector label, else its caption (normalised)."""
    return _normalise(region.get("label") or region.get("caption") or "")


def _score(region: dict) -> float:
    score = region.get("score", 1.0)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return -math.inf
    return float(score)


def filter_regions(regions: list[dict], width: int, height: int, *, min_score: float,
                   min_area: float, iou_threshold: float, text_labels: tuple[str, ...]
                   ) -> tuple[list[dict], Counter]:
    """Apply the per-image region rules.

    Args:
        regions: dicts with "box" [x1, y1, x2, y2] in pixels and optional "score", "label",
            "caption".
        width, height: image size in pixels.

    Returns:
        (kept regions in their input order, Counter of dropped regions per rule).
    """
    counts: Counter = Counter()
    text = {_normalise(t) for t in text_labels}
    candidates = []
    for region in regions:
        if text & {_normalise(region.get("label", "")), _normalise(region.get("caption", ""))}:
            counts["text_region"] += 1
        elif _score(region) < min_score:
            counts["low_score"] += 1
        else:
            candidates.append(region)
    if not candidates:
        return [], counts
    boxes = torch.tensor([r["box"] for r in candidates], dtype=torch.float64)
    scores = torch.tensor([_score(r) for r in candidates], dtype=torch.float64)
    large = (area_fraction(boxes, width, height) >= min_area).nonzero().flatten()
    counts["small_area"] += len(candidates) - len(large)
    kept = large[nms(boxes[large], scores[large], iou_threshold)]
    counts["nms"] += len(large) - len(kept)
    return [candidates[i] for i in sorted(kept.tolist())], counts


@dataclass
class _ClassWindowCounts:
    seen: int = 0
    kept: int = 0


class ClassBalancer:
    """Streaming class-balanced sampling of regions over windows of `window_images` images.

    Images are taken in stream order and grouped into consecutive windows of `window_images`
    (the last may be shorter); counts restart at each window. Within a window, for the i-th image
    (1-based) and each of its regions of class c, in order:

    1. the first `keep_whole_below` regions of c are kept: a class with fewer regions than that
       in the window is kept whole;
    2. once `cap_per_class` regions of c are kept, the rest are dropped: never more than the cap;
    3. otherwise the region is kept with probability min(1, q / r), where q = cap - kept is the
       quota left and r = 1 + (s / i) * (W - i) estimates the regions of c still to come in the
       window including this one (s = regions of c seen so far in the window, this one included,
       W = window_images). This is selection sampling (Knuth's Algorithm S) with the population
       estimated from the rate so far: when c occurs at a constant rate the estimate is exact and
       exactly `cap_per_class` regions are kept, spread uniformly over the window; a class with
       fewer than the cap is (nearly) kept whole, a frequent one is thinned proportionally.

    Memory is two counters per class seen in the current window. Random draws come from one
    generator seeded with `seed`, so a run over the same stream is reproducible. The rate estimate
    assumes the stream is in random order (shuffled web shards); a class that arrives in bursts
    can be kept below min(count, cap), and a window cut short by the end of the data is thinned as
    if it were full.
    """

    def __init__(self, keep_whole_below: int, cap_per_class: int, window_images: int,
                 seed: int = 0):
        if not 0 <= keep_whole_below <= cap_per_class:
            raise ValueError(f"need 0 <= keep_whole_below ({keep_whole_below}) <= cap_per_class "
                             f"({cap_per_class})")
        if window_images < 1:
            raise ValueError(f"window_images must be >= 1, got {window_images}")
        self.keep_whole_below = keep_whole_below
        self.cap_per_class = cap_per_class
        self.window_images = window_images
        self._rng = np.random.default_rng(seed)
        self._counts: dict[str, _ClassWindowCounts] = {}
        self._image_in_window = 0  # images of the current window seen so far
        self.window_index = 0

    def select(self, classes: list[str]) -> list[bool]:
        """Keep/drop decision for each region (given by class) of the next image in the stream."""
        if self._image_in_window == self.window_images:
            self._counts.clear()
            self._image_in_window = 0
            self.window_index += 1
        self._image_in_window += 1
        i, remaining_images = self._image_in_window, self.window_images - self._image_in_window
        decisions = []
        for cls in classes:
            counts = self._counts.setdefault(cls, _ClassWindowCounts())
            counts.seen += 1
            quota = self.cap_per_class - counts.kept
            if counts.kept < self.keep_whole_below:
                keep = True
            elif quota <= 0:
                keep = False
            else:
                still_to_come = 1.0 + counts.seen / i * remaining_images
                keep = quota >= still_to_come or self._rng.random() < quota / still_to_come
            counts.kept += keep
            decisions.append(keep)
        return decisions

    def window_counts(self) -> dict[str, tuple[int, int]]:
        """{class: (seen, kept)} of the current window."""
        return {cls: (c.seen, c.kept) for cls, c in self._counts.items()}
