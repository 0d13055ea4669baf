"""Stage III region-QA metrics: grounding by box IoU, region captions and OCR by text match, each
with the trivial baseline a model must beat to have learned more than the answer distribution.

Grounding (caption → box): the answer is read with ``BoxCodec.parse`` — exactly the training
format; anything else is a miss, counted in ``parse_failures`` — and compared in pixels of the
resized image (``BoxCodec.to_pixels``); a hit is IoU >= 0.5. Baseline: every answer is the mean
ground-truth box, taken in the codec's coordinates over the evaluated targets (relative 0–1000
by default, so one box for images of any size).

Text (box → caption, box → OCR): SQuAD's exact match and token F1 over normalised answers
(lowercase, punctuation and the articles a / an / the removed, whitespace collapsed). Baseline:
every answer is the most frequent normalised ground truth (ties: the alphabetically first).

Each function returns rates over its ``n`` items plus ``n``; with no items only ``{"n": 0}``
(a rate of nothing is undefined, and a 0 would read as a result).
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections import Counter
from typing import Sequence

from megatron_finevit.data.tasks.boxes import BoxCodec, BoxParseError

IOU_THRESHOLD = 0.5

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes ``[x1, y1, x2, y2]`` (``x1 <= x2``, ``y1 <= y2``);
    0 when the union has no area (two degenerate boxes)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0) * max(height, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mean_box(boxes: Sequence[Sequence[float]]) -> tuple[float, float, float, float]:
    """Coordinate-wise mean of ``boxes`` (a box again: the means keep ``x1 <= x2``)."""
    return tuple(sum(box[i] for box in boxes) / len(boxes) for i in range(4))


@dataclasses.dataclass(frozen=True)
class GroundingItem:
    """One grounding question: the target box (codec integers), the resized image size
    ``(H, W)`` both are relative to, and the model's answer text."""

    target: tuple[int, int, int, int]
    resized_hw: tuple[int, int]
    answer: str


def grounding_metrics(items: Sequence[GroundingItem], codec: BoxCodec,
                      threshold: float = IOU_THRESHOLD) -> dict[str, float]:
    """``{"acc", "baseline", "parse_failures", "n"}``: the fraction of answers with IoU >=
    ``threshold`` (unparseable answers miss), the same for the mean-box baseline, and the count
    of unparseable answers."""
    if not items:
        return {"n": 0}
    hits = failures = 0
    for item in items:
        try:
            box = codec.parse(item.answer, item.resized_hw)
        except BoxParseError:
            failures += 1
            continue
        hits += _iou_in_pixels(codec, box, item) >= threshold
    baseline = mean_box([item.target for item in items])
    baseline_hits = sum(_iou_in_pixels(codec, baseline, item) >= threshold for item in items)
    n = len(items)
    return {"acc": hits / n, "baseline": baseline_hits / n, "parse_failures": failures, "n": n}


def _iou_in_pixels(codec: BoxCodec, box, item: GroundingItem) -> float:
    return box_iou(codec.to_pixels(box, item.resized_hw),
                   codec.to_pixels(item.target, item.resized_hw))


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def token_f1(prediction: str, truth: str) -> float:
    """F1 of the normalised answers' token multisets; two empty answers agree (1.0)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def most_frequent_answer(truths: Sequence[str]) -> str:
    """The most frequent normalised answer of ``truths`` (ties: the alphabetically first)."""
    counts = Counter(normalize_answer(t) for t in truths)
    return min(counts, key=lambda answer: (-counts[answer], answer))


def text_metrics(predictions: Sequence[str], truths: Sequence[str]) -> dict[str, float]:
    """``{"em", "f1", "baseline_em", "baseline_f1", "n"}``: mean exact match and token F1 of
    ``predictions`` against ``truths`` (paired), and of the most frequent truth against all."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} answers")
    if not truths:
        return {"n": 0}
    n = len(truths)
    constant = most_frequent_answer(truths)
    return {"em": sum(map(exact_match, predictions, truths)) / n,
            "f1": sum(map(token_f1, predictions, truths)) / n,
            "baseline_em": sum(exact_match(constant, t) for t in truths) / n,
            "baseline_f1": sum(token_f1(constant, t) for t in truths) / n,
            "n": n}
