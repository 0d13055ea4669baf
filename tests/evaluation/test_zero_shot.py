"""Zero-shot classification on a synthetic text tower with a known answer, the classifier
against a numpy mean of normalised prompt embeddings, and data-parallel evaluation (zero-shot
counts summed over 2 ranks, retrieval on gathered shards) against one process."""

import zlib

import numpy as np
import pytest
import torch

from megatron_finevit.evaluation import (
    build_zero_shot_classifier,
    gather_rows,
    retrieval_recall,
    zero_shot_accuracy,
)
from megatron_finevit.testing.multirank import run_world

DIM = 32
CLASSES = ["cat", "dog", "car", "tree", "boat", "lamp", "shoe", "cup"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "{} in the wild."]


def _prototypes():
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(0)))
    return q[: len(CLASSES)]  # orthonormal class directions


class FakeTextTower:
    """A prompt -> its class's prototype (scaled) plus prompt-specific noise; records calls."""

    def __init__(self):
        self.protos = _prototypes()
        self.batches = []

    def __call__(self, prompts):
        self.batches.append(list(prompts))
        rows = []
        for prompt in prompts:
            cls = next(i for i, name in enumerate(CLASSES) if f" {name}" in f" {prompt}")
            gen = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
            rows.append(5.0 * self.protos[cls] + 0.3 * torch.randn(DIM, generator=gen))
        return torch.stack(rows)


def test_classifier_is_mean_of_normalised_prompt_embeddings():
    tower = FakeTextTower()
    classifier = build_zero_shot_classifier(CLASSES, tower, TEMPLATES, batch_size=5)
    assert max(len(b) for b in tower.batches) <= 5
    prompts = [p for b in tower.batches for p in b]
    assert prompts == [t.format(c) for c in CLASSES for t in TEMPLATES]
    emb = FakeTextTower()(prompts).double().numpy().reshape(len(CLASSES), len(TEMPLATES), DIM)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    want = emb.mean(axis=1)
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(classifier.numpy(), want, atol=1e-6)


def _synthetic_images():
    """10 'easy' images (on their class's prototype) and 6 'hard' ones that sit closer to another
    class: their label ranks second. Known answer: top-1 = 10/16, top-2 = top-5 = 1."""
    protos = _prototypes()
    labels = torch.tensor([i % len(CLASSES) for i in range(16)])
    emb = protos[labels].clone()
    for i in range(10, 16):
        decoy = (labels[i] + 3) % len(CLASSES)
        emb[i] = protos[decoy] + 0.8 * protos[labels[i]]
    return emb * 2.0, labels


def test_known_answer():
    classifier = build_zero_shot_classifier(CLASSES, FakeTextTower(), TEMPLATES)
    emb, labels = _synthetic_images()
    got = zero_shot_accuracy(emb, labels, classifier, ks=(1, 2, 5), chunk=3)
    assert got == {"top1": 10 / 16, "top2": 1.0, "top5": 1.0}
    with pytest.raises(ValueError, match="class indices"):
        zero_shot_accuracy(emb, labels + len(CLASSES), classifier)


def _dp_eval_world(rank, world_size, emb, labels, classifier, image, text, owner):
    import torch.distributed as dist

    group = dist.group.WORLD
    # Unequal shards: rank 0 holds the first 5 images and 9 captions, rank 1 the rest.
    images = slice(0, 5) if rank == 0 else slice(5, None)
    captions = slice(0, 9) if rank == 0 else slice(9, None)
    zs = zero_shot_accuracy(emb[images], labels[images], classifier, ks=(1, 2), group=group)
    gathered = (gather_rows(image[images], group), gather_rows(text[captions], group),
                gather_rows(owner[captions], group))
    whole = (image, text, owner)
    return {"zero_shot": zs, "retrieval": retrieval_recall(*gathered),
            "gathered_equal": all(torch.equal(g, w) for g, w in zip(gathered, whole))}


def test_data_parallel_evaluation_equals_single_process():
    classifier = build_zero_shot_classifier(CLASSES, FakeTextTower(), TEMPLATES)
    emb, labels = _synthetic_images()
    gen = torch.Generator().manual_seed(3)
    image = torch.randn(12, DIM, generator=gen)
    owner = torch.repeat_interleave(torch.arange(12), 2)[torch.randperm(24, generator=gen)]
    text = image[owner] + 1.5 * torch.randn(24, DIM, generator=gen)
    results = run_world(_dp_eval_world, 2,
                        args=(emb, labels, classifier, image, text, owner))
    want_zs = zero_shot_accuracy(emb, labels, classifier, ks=(1, 2))
    want_ret = retrieval_recall(image, text, owner)
    for r in results:
        assert r["zero_shot"] == want_zs
        assert r["gathered_equal"]
        assert r["retrieval"] == want_ret
