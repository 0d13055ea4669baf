"""Task kinds and their mixture: validation, deterministic draws from (seed, key, step), the
fallback to available kinds, one turn per annotation, frequencies against the weights."""

import random

import numpy as np
import pytest

from megatron_finevit.data.tasks.boxes import BoxCodec
from megatron_finevit.data.tasks.region_qa import (PARAPHRASES, TASK_KINDS, TaskMixture,
                                                   draw_turns)

META = {"caption": "Two circles and a sign.", "width": 400, "height": 200,
        "regions": [{"box": [0, 0, 100, 100], "caption": "a red circle", "label": "circle",
                     "score": 1.0},
                    {"box": [200, 0, 300, 100], "caption": "a blue circle", "label": "circle",
                     "score": 1.0},
                    {"box": [300, 100, 400, 200], "caption": "a blue circle", "label": "circle",
                     "score": 0.9}],
        "ocr": [{"box": [100, 150, 200, 190], "text": "OPEN"}]}


def draw(meta=META, mixture=TaskMixture(), key="k", step=0, max_turns=8, seed=0):
    return draw_turns(meta, original_hw=(meta["height"], meta["width"]), resized_hw=(196, 392),
                      codec=BoxCodec(), mixture=mixture, seed=seed, key=key, step=step,
                      max_turns=max_turns)


def test_mixture_is_validated():
    assert TaskMixture.from_dict({"ocr_to_bbox": 2.0}).weights()["ocr_to_bbox"] == 2.0
    with pytest.raises(ValueError, match="unknown task kinds"):
        TaskMixture.from_dict({"bbox_to_text": 1.0})
    with pytest.raises(ValueError, match="all zero"):
        TaskMixture(**{k: 0.0 for k in TASK_KINDS})
    for bad in (-1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="non-negative"):
            TaskMixture(global_caption=bad)


def test_draws_are_a_function_of_seed_key_and_step():
    first = draw()
    np.random.seed(123), random.seed(123)  # global RNGs play no part
    assert draw() == first
    assert any(draw(step=s) != first for s in range(1, 4))
    assert any(draw(key=f"k{s}") != first for s in range(3))
    assert any(draw(seed=s) != first for s in range(1, 4))
    # Every paraphrase of every kind comes up over enough draws.
    seen = {(t.kind, t.question) for s in range(200) for t in draw(step=s)}
    for kind, prompts in PARAPHRASES.items():
        for prompt in prompts:
            assert any(k == kind and q.startswith(prompt.split("{")[0]) for k, q in seen), prompt


def test_each_annotation_serves_one_turn_and_grounding_needs_a_unique_text():
    for step in range(50):
        turns = draw(step=step)
        # caption + 3 regions + 1 OCR = 5 annotations, each used once.
        assert len(turns) == 5
        texts = [t.answer if t.kind in ("bbox_to_caption", "bbox_to_ocr") else t.question
                 for t in turns if t.kind != "global_caption"]
        assert sum("red circle" in t for t in texts) == 1
        assert sum("OPEN" in t for t in texts) == 1
        # "a blue circle" names two regions: never asked to ground, always described.
        assert all("blue" not in t.question for t in turns if t.kind == "caption_to_bbox")
        assert sum(t.answer == "a blue circle" for t in turns) == 2
    assert len(draw(max_turns=2)) == 2


def test_missing_annotations_fall_back_to_available_kinds():
    no_ocr = {**META, "ocr": []}
    kinds = {t.kind for s in range(30) for t in draw(no_ocr, step=s)}
    assert kinds == {"global_caption", "bbox_to_caption", "caption_to_bbox"}
    ocr_only = TaskMixture(**{k: float("ocr" in k) for k in TASK_KINDS})
    assert draw(no_ocr, ocr_only) == []  # nothing to ask: the loader skips and counts it
    assert {t.kind for t in draw(META, ocr_only)} <= {"bbox_to_ocr", "ocr_to_bbox"}
    no_caption = {**META, "caption": "  "}
    assert all(t.kind != "global_caption" for s in range(30) for t in draw(no_caption, step=s))


def test_first_turn_kinds_follow_the_weights():
    """With every kind available, the first turn's kind is drawn with p = w / sum(w)."""
    weights = {"global_caption": 4.0, "bbox_to_caption": 2.0, "caption_to_bbox": 1.0,
               "bbox_to_ocr": 1.0, "ocr_to_bbox": 0.0}
    mixture, n = TaskMixture(**weights), 4000
    counts = dict.fromkeys(TASK_KINDS, 0)
    for i in range(n):
        counts[draw(mixture=mixture, key=f"sample{i}", max_turns=1)[0].kind] += 1
    assert counts["ocr_to_bbox"] == 0
    total = sum(weights.values())
    for kind, weight in weights.items():
        p = weight / total
        assert abs(counts[kind] / n - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-12, (kind, counts)
