"""Stage II evaluation on a held-out split: image ↔ text retrieval and zero-shot classification.

Each data-parallel rank embeds its share of the split (``vision.forward_over_split``: one pass
through megatron's forward-only schedule, so pipeline parallelism works as in training); the last
pipeline stage gathers the embeddings of all DP ranks and scores them (``evaluation/``).

Zero-shot classes are the synthetic data's "colour shape" pairs (``data.synthetic``): an image
counts when it holds exactly one shape, its label is that shape's region caption ("a red
circle"), and the class prompts are the region captions of every colour and shape.
"""

from __future__ import annotations

import math

import torch

from megatron_finevit.data.synthetic import COLORS, SHAPES
from megatron_finevit.evaluation import (
    build_zero_shot_classifier,
    gather_rows,
    retrieval_recall,
    zero_shot_accuracy,
)
from megatron_finevit.platform.distributed import collective_device
from megatron_finevit.training.stages.vision import forward_over_split

ZERO_SHOT_TEMPLATES = ("{}.", "{} in the center.")


def shape_classes() -> list[str]:
    return [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c in COLORS for s in SHAPES]


def _embed_split(stage, model_chunks, data_dir: str):
    """This rank's images and captions of the split -> (image [n, d], text [n, d], class label
    [n] (−1: not single-shape)) on the last pipeline stage; None elsewhere."""
    from megatron.core import parallel_state as ps

    classes = {name: i for i, name in enumerate(shape_classes())}
    labels = []

    def forward(batch, model):
        inp = stage.encoder_input(batch)
        if torch.cuda.is_available():
            inp.patches = inp.patches.cuda()
        last = ps.is_pipeline_last_stage()
        ids = stage.tokenize(batch.captions, stage.step) if last else None
        labels.extend(classes.get(m["regions"][0]["caption"], -1) if len(m["regions"]) == 1
                      and not m["ocr"] else -1 for m in batch.metas)
        return model(inp, ids, embeddings=True), lambda out: {k: v.float().cpu()
                                                              for k, v in out.items()}

    collected = forward_over_split(stage, model_chunks, data_dir, forward)
    if collected is None:
        return None
    image = torch.cat([c["image"] for c in collected])
    text = torch.cat([c["text"] for c in collected])
    return image, text, torch.tensor(labels, dtype=torch.long)


def evaluate_contrastive(stage, model_chunks, data_dir: str) -> dict[str, float]:
    """``{"i2t_r1": …, "t2i_r10": …, "zero_shot_top1": …, "chance_r1": …}`` on the last pipeline
    stage (fractions in [0, 1]); {} on other stages."""
    from megatron.core import parallel_state as ps

    local = _embed_split(stage, model_chunks, data_dir)
    if local is None:
        return {}
    group = ps.get_data_parallel_group() if ps.get_data_parallel_world_size() > 1 else None
    device = collective_device()  # NCCL gathers CUDA tensors; scoring then runs on the CPU
    image, text, labels = (gather_rows(t.to(device), group).cpu() for t in local)
    results = retrieval_recall(image, text, torch.arange(len(image)))
    results["chance_r1"] = 1.0 / len(image)
    results["num_images"] = float(len(image))
    single = labels >= 0
    if single.any():
        names = shape_classes()

        def encode(prompts):
            device = next(stage.module.text_tower.parameters()).device
            return stage.module.text_tower(stage.tokenize(prompts, stage.step).to(device))

        classifier = build_zero_shot_classifier(names, encode, ZERO_SHOT_TEMPLATES)
        accuracy = zero_shot_accuracy(image[single], labels[single], classifier.cpu(), ks=(1, 5))
        results.update({f"zero_shot_{k}": v for k, v in accuracy.items()})
        results["zero_shot_images"] = float(single.sum())
        results["zero_shot_chance_top1"] = 1.0 / len(names)
    return {k: v for k, v in results.items() if math.isfinite(v)}
