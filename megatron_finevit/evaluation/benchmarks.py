"""The paper's benchmarks (§4) on a model: zero-shot ImageNet-1k / v2 / ReaL top-1 and
retrieval R@1 on COCO, Flickr30k, DCI, IIW and Urban-1K.

    results = run_benchmark("coco", data_dir, encoders)

``benchmark_sets`` lists the files; here every image is read and decoded (an unreadable or
undecodable one is skipped, logged and counted per reason in ``skipped_<reason>``: its label or
captions leave the set with it), embedded by the model in batches, and scored by
``zero_shot_accuracy`` / ``retrieval_recall``.

Zero-shot classifiers use open_clip's ImageNet class names and its 80 OpenAI prompt templates:
from the ``open_clip`` package when it is installed, else the copy in
``data/imagenet_zero_shot.json`` (MIT, see ``data/README.md``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from megatron_finevit.data.bad_samples import BadSampleError
from megatron_finevit.evaluation.benchmark_sets import (
    BENCHMARKS,
    BenchmarkDataError,
    ClassificationSet,
    RetrievalSet,
)
from megatron_finevit.evaluation.retrieval import retrieval_recall
from megatron_finevit.evaluation.zero_shot import build_zero_shot_classifier, zero_shot_accuracy

log = logging.getLogger(__name__)

IMAGENET_METADATA = Path(__file__).parent / "data" / "imagenet_zero_shot.json"


@dataclass
class Encoders:
    """What a benchmark needs from a model.

    decode: encoded image bytes -> float ``[3, H, W]`` (raises ``BadSampleError``);
    embed_images: ``image_batch`` decoded images at most -> ``[n, d]``;
    embed_texts: ``text_batch`` strings at most -> ``[n, d]`` (truncated to the model's context).
    """

    decode: Callable[[bytes], torch.Tensor]
    embed_images: Callable[[list[torch.Tensor]], torch.Tensor]
    embed_texts: Callable[[list[str]], torch.Tensor]
    image_batch: int = 32
    text_batch: int = 256


def imagenet_zero_shot() -> tuple[list[str], list[str]]:
    """open_clip's 1,000 ImageNet class names and OpenAI's 80 templates (``"a photo of a {}."``)."""
    try:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    except ImportError:
        data = json.loads(IMAGENET_METADATA.read_text())
        return data["classnames"], data["templates"]
    return list(IMAGENET_CLASSNAMES), [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def embed_image_files(paths: Sequence[Path], encoders: Encoders
                      ) -> tuple[torch.Tensor, list[int], Counter]:
    """Read, decode and embed ``paths``: (float32 ``[n_kept, d]``, the kept indices into
    ``paths``, skipped images per reason)."""
    rows, kept, skipped, batch = [], [], Counter(), []

    def flush():
        if batch:
            rows.append(encoders.embed_images([image for _, image in batch]).float().cpu())
            kept.extend(index for index, _ in batch)
            batch.clear()

    for index, path in enumerate(paths):
        try:
            batch.append((index, encoders.decode(Path(path).read_bytes())))
        except OSError as exc:
            skipped["unreadable_file"] += 1
            log.warning("skipped %s (unreadable_file): %s", path, exc)
        except BadSampleError as exc:
            skipped[exc.reason] += 1
            log.warning("skipped %s (%s)", path, exc)
        if len(batch) == encoders.image_batch:
            flush()
    flush()
    if not kept:
        raise BenchmarkDataError(f"none of the {len(paths)} images could be read "
                                 f"({dict(skipped)}): check the data layout")
    return torch.cat(rows), kept, skipped


def _counts(kept: list[int], skipped: Counter) -> dict[str, float]:
    return {"num_images": float(len(kept)), "skipped_images": float(sum(skipped.values())),
            **{f"skipped_{reason}": float(n) for reason, n in sorted(skipped.items())}}


def evaluate_zero_shot(data: ClassificationSet, encoders: Encoders, class_names: Sequence[str],
                       templates: Sequence[str]) -> dict[str, float]:
    """``{"top1", "top5", "num_images", "skipped_images", ...}``: an image is a hit at ``k``
    when any of its correct classes ranks below ``k`` (ReaL's multi-label top-1)."""
    if data.num_classes not in (None, len(class_names)):
        raise BenchmarkDataError(f"the layout defines {data.num_classes} classes, the class "
                                 f"names {len(class_names)}: every class folder must be there")
    out_of_range = [l for labels in data.labels for l in labels if not 0 <= l < len(class_names)]
    if out_of_range:
        raise BenchmarkDataError(f"labels must be in [0, {len(class_names)}), got e.g. "
                                 f"{out_of_range[0]}")
    image, kept, skipped = embed_image_files(data.images, encoders)
    positive = torch.zeros(len(kept), len(class_names), dtype=torch.bool)
    for row, index in enumerate(kept):
        positive[row, data.labels[index]] = True
    classifier = build_zero_shot_classifier(class_names, encoders.embed_texts, templates,
                                            batch_size=encoders.text_batch)
    return {**zero_shot_accuracy(image, positive, classifier, ks=(1, 5)), **_counts(kept, skipped)}


def evaluate_retrieval(data: RetrievalSet, encoders: Encoders) -> dict[str, float]:
    """``{"i2t_r1", …, "t2i_r10", "num_images", "num_captions", "skipped_images", ...}``:
    image → text hits when any of the image's captions ranks below ``k``."""
    image, kept, skipped = embed_image_files(data.images, encoders)
    position = {index: row for row, index in enumerate(kept)}
    # a skipped image's captions go too: their correct answer is not among the candidates
    pairs = [(text, position[i]) for text, i in zip(data.captions, data.caption_image)
             if i in position]
    captions = [text for text, _ in pairs]
    with torch.no_grad():
        text = torch.cat([encoders.embed_texts(captions[i:i + encoders.text_batch]).float().cpu()
                          for i in range(0, len(captions), encoders.text_batch)])
    owner = torch.tensor([row for _, row in pairs])
    return {**retrieval_recall(image, text, owner), **_counts(kept, skipped),
            "num_captions": float(len(captions))}


def run_benchmark(name: str, data_dir: str | Path, encoders: Encoders) -> dict[str, float]:
    """Import ``name``'s set from ``data_dir`` (``benchmark_sets``) and score ``encoders``."""
    benchmark = BENCHMARKS[name]
    data = benchmark.load(Path(data_dir))
    if benchmark.kind == "zero_shot":
        return evaluate_zero_shot(data, encoders, *imagenet_zero_shot())
    return evaluate_retrieval(data, encoders)


def format_benchmark(name: str, results: dict[str, float]) -> str:
    """The results as the CLI prints them (percent)."""
    skipped = int(results["skipped_images"])
    reasons = ", ".join(f"{k[len('skipped_'):]}={int(v)}" for k, v in results.items()
                        if k.startswith("skipped_") and k != "skipped_images")
    note = f"; {skipped} skipped ({reasons})" if skipped else ""
    if "top1" in results:
        return (f"{name} zero-shot over {int(results['num_images'])} images{note}: top-1 "
                f"{100 * results['top1']:.2f}%, top-5 {100 * results['top5']:.2f}%")
    lines = [f"{name} retrieval over {int(results['num_images'])} images / "
             f"{int(results['num_captions'])} captions{note} (recall, %)",
             f"{'':14s}{'R@1':>8s}{'R@5':>8s}{'R@10':>8s}"]
    for label, key in (("image->text", "i2t"), ("text->image", "t2i")):
        lines.append(f"{label:14s}" + "".join(f"{100 * results[f'{key}_r{k}']:8.2f}"
                                              for k in (1, 5, 10)))
    return "\n".join(lines)
