"""Zero-shot classification (paper §4: ImageNet-1k / v2 / ReaL top-1).

Each class name is put into every prompt template (``"a photo of a {}."``), the prompts are
encoded by the text tower, each embedding is L2-normalised, and a class's classifier vector is
the normalised mean over its templates. An image is classified by cosine similarity to those
vectors; top-k accuracy counts images whose label ranks below ``k`` (ties count against the
image, see ``evaluation.ranking``). With several correct labels per image (ImageNet-ReaL) an
image counts when any of them ranks below ``k``: ReaL's top-1 (the prediction is in the image's
set of labels).

Works during training (each data-parallel rank scores its shard of the evaluation images; pass
``group`` and the counts are summed over it) and standalone (one process, all images).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from megatron_finevit.evaluation.ranking import best_positive_rank, cosine_scores, hits_at_k

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a cropped photo of a {}.",
    "a drawing of a {}.",
)

EncodeText = Callable[[list[str]], torch.Tensor]


def build_zero_shot_classifier(class_names: Sequence[str], encode_text: EncodeText,
                               templates: Sequence[str] = DEFAULT_TEMPLATES,
                               batch_size: int = 256) -> torch.Tensor:
    """Class names × templates -> ``[n_classes, d]`` float32 unit vectors.

    ``encode_text(prompts) -> [len(prompts), d]`` is called on batches of at most
    ``batch_size`` prompts (under ``torch.no_grad``)."""
    if not class_names or not templates:
        raise ValueError("need at least one class name and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates must contain '{{}}' for the class name: {bad}")
    prompts = [template.format(name) for name in class_names for template in templates]
    with torch.no_grad():
        embeddings = torch.cat([encode_text(prompts[i:i + batch_size]).float()
                                for i in range(0, len(prompts), batch_size)])
    if embeddings.shape[0] != len(prompts):
        raise ValueError(f"encode_text returned {embeddings.shape[0]} rows for "
                         f"{len(prompts)} prompts")
    per_template = torch.nn.functional.normalize(embeddings, dim=-1)
    per_template = per_template.view(len(class_names), len(templates), -1)
    return torch.nn.functional.normalize(per_template.mean(dim=1), dim=-1)


def zero_shot_accuracy(image_emb: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                       ks: Sequence[int] = (1, 5), chunk: int = 4096,
                       group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Top-k accuracy of ``image_emb [n, d]`` against ``classifier [n_classes, d]``:
    ``{"top1": …, "top5": …}`` (fractions in [0, 1]).

    ``labels`` is int ``[n]`` (one class per image) or bool ``[n, n_classes]`` (every correct
    class of each image, at least one per image: ImageNet-ReaL). With ``group`` the hit counts
    and image counts are summed over its ranks (each rank passes its own images), so every rank
    gets the accuracy over all of them."""
    if image_emb.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_emb.shape[0]} images but {labels.shape[0]} labels")
    if labels.dtype == torch.bool:
        if labels.shape[1:] != classifier.shape[:1]:
            raise ValueError(f"a label mask needs {classifier.shape[0]} columns, got "
                             f"{tuple(labels.shape)}")
    elif labels.numel() and (labels.min() < 0 or labels.max() >= classifier.shape[0]):
        raise ValueError(f"labels must be class indices in [0, {classifier.shape[0]})")
    classes = torch.arange(classifier.shape[0], device=labels.device)
    counts = torch.zeros(len(ks) + 1, dtype=torch.long, device=image_emb.device)
    for start in range(0, image_emb.shape[0], chunk):
        scores = cosine_scores(image_emb[start:start + chunk], classifier)
        rows = labels[start:start + chunk]
        positive = rows if rows.dtype == torch.bool else rows[:, None] == classes[None]
        counts[:-1] += hits_at_k(best_positive_rank(scores, positive), ks).to(counts.device)
    counts[-1] = image_emb.shape[0]
    if group is not None:
        dist.all_reduce(counts, group=group)
    if counts[-1] == 0:
        raise ValueError("no images to evaluate")
    return {f"top{k}": hit / counts[-1].item() for k, hit in zip(ks, counts[:-1].tolist())}
