"""Box ops and NMS against brute-force pure-Python references."""

import random

import pytest
import torch

from megatron_finevit.curation.boxes import area_fraction, box_area, nms, pairwise_iou


def reference_iou(a, b):
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def reference_nms(boxes, scores, threshold):
    """Greedy NMS straight from the definition: repeatedly take the best remaining box."""
    remaining = list(range(len(boxes)))
    kept = []
    while remaining:
        best = max(remaining, key=lambda i: (scores[i], -i))  # ties: lower index first
        kept.append(best)
        remaining = [i for i in remaining
                     if i != best and reference_iou(boxes[best], boxes[i]) <= threshold]
    return kept


def random_boxes(rng, n, size=100, degenerate_fraction=0.1):
    boxes = []
    for _ in range(n):
        x1, y1 = rng.randint(0, size), rng.randint(0, size)
        if rng.random() < degenerate_fraction:  # zero width/height or inverted
            boxes.append([x1, y1, x1 - rng.randint(0, 5), y1 + rng.randint(0, 30)])
        else:
            boxes.append([x1, y1, x1 + rng.randint(1, 60), y1 + rng.randint(1, 60)])
    if n > 1 and rng.random() < 0.5:  # identical boxes
        boxes[rng.randrange(n)] = list(boxes[0])
    return boxes


def test_pairwise_iou_matches_reference():
    rng = random.Random(0)
    a, b = random_boxes(rng, 30), random_boxes(rng, 20)
    got = pairwise_iou(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    want = torch.tensor([[reference_iou(x, y) for y in b] for x in a], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert got.shape == (30, 20)


def test_box_area_and_area_fraction_clip_to_image():
    boxes = torch.tensor([[0, 0, 10, 20], [5, 5, 5, 9], [8, 8, 2, 2], [-10, -10, 50, 10]],
                         dtype=torch.float32)
    assert box_area(boxes).tolist() == [200, 0, 0, 60 * 20]
    # clipped to a 40x10 image: the last box covers x 0..40, y 0..10 = the whole image
    assert area_fraction(boxes, 40, 10).tolist() == pytest.approx([100 / 400, 0, 0, 1.0])


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_matches_brute_force_on_random_sets(threshold):
    rng = random.Random(int(threshold * 10))
    for trial in range(150):
        n = rng.randint(0, 25)
        boxes = random_boxes(rng, n)
        # integer scores from a small range make many ties
        scores = [float(rng.randint(0, 4)) for _ in range(n)]
        got = nms(torch.tensor(boxes, dtype=torch.float64).reshape(n, 4),
                  torch.tensor(scores, dtype=torch.float64), threshold)
        assert got.dtype == torch.long
        assert got.tolist() == reference_nms(boxes, scores, threshold), (trial, boxes, scores)


def test_nms_edge_cases():
    empty = nms(torch.zeros(0, 4), torch.zeros(0), 0.7)
    assert empty.tolist() == []
    same = torch.tensor([[0.0, 0, 10, 10]] * 3)
    # identical boxes (IoU 1): only the best (first on ties) survives below threshold 1 ...
    assert nms(same, torch.tensor([0.5, 0.9, 0.9]), 0.7).tolist() == [1]
    # ... and all survive at threshold 1 (suppression needs IoU > threshold)
    assert nms(same, torch.tensor([0.5, 0.9, 0.9]), 1.0).tolist() == [1, 2, 0]
    # degenerate boxes overlap nothing, so they are never suppressed and suppress nothing
    degenerate = torch.tensor([[5.0, 5, 5, 9], [0, 0, 10, 10], [5, 5, 5, 9]])
    assert nms(degenerate, torch.tensor([0.9, 0.8, 0.7]), 0.0).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="boxes"):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
