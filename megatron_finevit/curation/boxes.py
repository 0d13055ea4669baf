"""Box operations in torch: area, pairwise IoU, class-agnostic NMS.

Our own because torchvision does not import beside the CPU torch build. Boxes are `[n, 4]`
float tensors `(x1, y1, x2, y2)` in pixels; a box with x2 <= x1 or y2 <= y1 is degenerate and
has area 0. Semantics follow the usual detection convention (and torchvision's `nms`): a box is
suppressed when its IoU with a higher-scored kept box is strictly greater than the threshold.
"""

from __future__ import annotations

import torch


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of each box. `boxes [n, 4]` -> `[n]`; degenerate boxes have area 0."""
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    return widths * heights


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of every pair. `a [n, 4]`, `b [m, 4]` -> `[n, m]`.

    A pair whose union is empty (two degenerate boxes) has IoU 0.
    """
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny),
                       torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Class-agnostic non-maximum suppression.

    Args:
        boxes: `[n, 4]` (x1, y1, x2, y2).
        scores: `[n]`; ties are broken by the lower index first (stable sort).
        iou_threshold: a box whose IoU with an already kept box is > this is suppressed.

    Returns:
        `[k]` int64 indices of the kept boxes, in decreasing score order.

    Cost: one `[n, n]` IoU matrix, then one vectorised row update per kept box (boxes per image
    are at most a few hundred, so O(n^2) memory is small).
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"nms expects boxes [n, 4] and scores [n], got {tuple(boxes.shape)} "
                         f"and {tuple(scores.shape)}")
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_boxes = boxes[order].to(torch.promote_types(boxes.dtype, torch.float32))
    iou = pairwise_iou(sorted_boxes, sorted_boxes)
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    kept = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        kept.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(kept, dtype=torch.long)]


def area_fraction(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Area of each box (clipped to the image) over the image area. `[n, 4]` -> `[n]`."""
    limits = torch.tensor([width, height, width, height], dtype=boxes.dtype)
    clipped = torch.minimum(boxes.clamp(min=0), limits)
    return box_area(clipped) / float(width * height)
