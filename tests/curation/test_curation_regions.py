"""Region rules (text, score, area, NMS) and streaming class-balanced sampling."""

import random
from collections import Counter

import pytest
import torch

from megatron_finevit.curation.boxes import nms
from megatron_finevit.curation.regions import ClassBalancer, filter_regions, region_class

RULES = dict(min_score=0.3, min_area=0.01, iou_threshold=0.7, text_labels=("text",))


def test_each_rule_drops_its_regions_and_counts_add_up():
    w, h = 200, 100  # 1% of the area = 200 px^2
    regions = [
        {"box": [0, 0, 100, 100], "label": "dog", "caption": "a dog", "score": 0.9},
        {"box": [1, 1, 100, 100], "label": "dog", "caption": "dog again", "score": 0.8},  # nms
        {"box": [0, 0, 100, 100], "label": "cat", "caption": "a cat", "score": 0.2},  # low score
        {"box": [10, 10, 20, 29], "label": "ant", "caption": "an ant", "score": 0.9},  # 190 px^2
        {"box": [10, 10, 30, 20], "label": "bee", "caption": "a bee", "score": 0.9},  # 200 px^2
        {"box": [120, 0, 200, 50], "label": "Text", "caption": "a sign", "score": 0.99},
        {"box": [120, 50, 200, 100], "label": "sign", "caption": " TEXT ", "score": 0.99},
        {"box": [100, 0, 200, 100], "label": "car", "caption": "a car"},  # no score: annotation
        {"box": [100, 0, 199, 100], "label": "car", "caption": "a car", "score": "high"},  # bad
    ]
    kept, counts = filter_regions(regions, w, h, **RULES)
    assert [r["caption"] for r in kept] == ["a dog", "a bee", "a car"]
    assert counts == Counter(text_region=2, low_score=2, small_area=1, nms=1)
    assert len(kept) + sum(counts.values()) == len(regions)


def test_filter_regions_nms_agrees_with_nms_on_large_confident_boxes():
    rng = random.Random(3)
    for _ in range(20):
        regions = []
        for i in range(rng.randint(0, 30)):
            x, y = rng.randint(0, 150), rng.randint(0, 150)
            regions.append({"box": [x, y, x + rng.randint(30, 100), y + rng.randint(30, 100)],
                            "label": f"c{i % 3}", "score": rng.choice([0.5, 0.6, 0.7])})
        kept, counts = filter_regions(regions, 256, 256, **RULES)
        boxes = torch.tensor([r["box"] for r in regions], dtype=torch.float64).reshape(-1, 4)
        scores = torch.tensor([r["score"] for r in regions], dtype=torch.float64)
        want = sorted(nms(boxes, scores, 0.7).tolist())
        assert kept == [regions[i] for i in want]
        assert counts["nms"] == len(regions) - len(want)


def test_region_class_normalises_label_then_caption():
    assert region_class({"label": "  Red   Car ", "caption": "x"}) == "red car"
    assert region_class({"caption": "A Dog"}) == "a dog"
    assert region_class({}) == ""


def stream(balancer, images):
    """Run a balancer over `images` (lists of classes); return per-window kept counts per class."""
    kept = []
    for classes in images:
        decisions = balancer.select(classes)
        if balancer.window_index == len(kept):
            kept.append(Counter())
        kept[-1].update(c for c, keep in zip(classes, decisions) if keep)
    return kept


def test_balancer_keeps_rare_classes_whole_and_caps_frequent_ones_per_window():
    rng = random.Random(0)
    window, cap, whole = 400, 50, 10
    images = []
    for _ in range(3):
        rare = set(rng.sample(range(window), 8))  # 8 per window: < keep_whole_below
        medium = set(rng.sample(range(window), 40))  # between keep_whole_below and the cap
        for i in range(window):
            classes = ["every_image"] + ["twice"] * 2  # 400 and 800 per window
            classes += ["rare"] * (i in rare) + ["medium"] * (i in medium)
            rng.shuffle(classes)
            images.append(classes)
    seen = [Counter(c for im in images[w * window:(w + 1) * window] for c in im) for w in range(3)]
    kept = stream(ClassBalancer(whole, cap, window, seed=1), images)
    assert len(kept) == 3
    for got, counts in zip(kept, seen):
        assert got["rare"] == counts["rare"] < whole
        assert got["every_image"] == cap  # constant rate: the estimate is exact -> exactly cap
        assert 0.8 * cap <= got["twice"] <= cap
        assert got["medium"] >= 0.8 * counts["medium"]  # below the cap: (nearly) whole


def test_balancer_picks_uniformly_over_the_window_beyond_the_first_keep_whole():
    window, cap, whole, trials = 100, 30, 5, 400
    hits = torch.zeros(window)
    for seed in range(trials):
        balancer = ClassBalancer(whole, cap, window, seed=seed)
        hits += torch.tensor([balancer.select(["a"])[0] for _ in range(window)], dtype=torch.float)
    assert hits[:whole].tolist() == [trials] * whole
    # Algorithm S: every later position is picked with probability (cap - whole) / (window - whole)
    expected = trials * (cap - whole) / (window - whole)
    rate = hits[whole:]
    assert abs(rate.mean().item() - expected) < 1e-6 * trials  # exactly cap picks every trial
    fifths = rate.reshape(5, -1).mean(dim=1)  # no part of the window is favoured
    assert torch.all((fifths - expected).abs() < 0.12 * expected), fifths


def test_balancer_is_deterministic_by_seed():
    images = [["x"] * 3 for _ in range(200)]

    def run(seed):
        balancer = ClassBalancer(2, 20, 200, seed=seed)
        return [balancer.select(classes) for classes in images]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_balancer_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="keep_whole_below"):
        ClassBalancer(10, 5, 100)
    with pytest.raises(ValueError, match="window_images"):
        ClassBalancer(1, 5, 0)
