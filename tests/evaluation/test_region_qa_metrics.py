"""Region-QA metrics (``evaluation.region_qa``) against hand-computed values, and the Stage III
evaluation's questions and scoring (``training.stages.align_eval``) without a model."""

from __future__ import annotations

import pytest

from megatron_finevit.data.tasks.boxes import ABSOLUTE, BoxCodec
from megatron_finevit.data.tasks.region_qa import (BBOX_TO_CAPTION, BBOX_TO_OCR, CAPTION_TO_BBOX,
                                                   PARAPHRASES)
from megatron_finevit.evaluation.region_qa import (
    GroundingItem,
    box_iou,
    exact_match,
    grounding_metrics,
    mean_box,
    most_frequent_answer,
    normalize_answer,
    text_metrics,
    token_f1,
)
from megatron_finevit.training.stages.align_eval import EvalAnswer, align_metrics, eval_questions


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert box_iou((0, 0, 10, 10), (0, 0, 5, 10)) == 0.5
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0  # touching corners
    assert box_iou((0, 0, 10, 10), (20, 0, 30, 10)) == 0.0
    assert box_iou((3, 3, 3, 3), (3, 3, 3, 3)) == 0.0  # no area at all
    assert mean_box([(0, 0, 100, 100), (0, 0, 100, 100), (0, 0, 200, 200)]) == pytest.approx(
        (0, 0, 400 / 3, 400 / 3))


def test_grounding_accuracy_baseline_and_parse_failures():
    codec = BoxCodec()  # relative 0-1000
    items = [
        GroundingItem((0, 0, 100, 100), (280, 560), "[0, 0, 100, 100]"),    # IoU 1: hit
        GroundingItem((0, 0, 100, 100), (280, 280), "[0, 0, 50, 100]"),     # IoU 0.5: hit
        GroundingItem((0, 0, 200, 200), (280, 280), "[150, 150, 200, 200]"),  # 1/16: miss
        GroundingItem((0, 0, 100, 100), (280, 280), "[0, 0, 1001, 10]"),    # out of range
        GroundingItem((0, 0, 100, 100), (280, 280), "box: [0, 0, 100, 100]"),  # not a box
    ]
    # mean box (0, 0, 120, 120): IoU 10000 / 14400 with the 100-boxes (hits), 14400 / 40000
    # with the 200-box (miss)
    assert grounding_metrics(items, codec) == {"acc": 0.4, "baseline": 0.8,
                                               "parse_failures": 2, "n": 5}
    assert grounding_metrics(items, codec, threshold=0.6)["acc"] == 0.2
    assert grounding_metrics([], codec) == {"n": 0}


def test_grounding_in_absolute_pixels():
    codec = BoxCodec(ABSOLUTE)
    items = [GroundingItem((0, 0, 560, 280), (280, 560), "[0, 0, 560, 280]"),
             GroundingItem((0, 0, 280, 280), (280, 560), "[0, 0, 561, 1]")]  # x2 > width
    assert grounding_metrics(items, codec) == {"acc": 0.5, "baseline": 1.0,
                                               "parse_failures": 1, "n": 2}


def test_text_normalisation_exact_match_and_f1():
    assert normalize_answer("The  Red, circle!") == "red circle"
    assert normalize_answer("an apple a day") == "apple day"
    assert exact_match("A red circle.", "red circle") == 1.0
    assert exact_match("red circles", "red circle") == 0.0
    assert token_f1("a big red circle", "red circle") == pytest.approx(0.8)  # P 2/3, R 1
    assert token_f1("big blue", "blue square") == 0.5
    assert token_f1("red red", "red") == pytest.approx(2 / 3)  # multiset: P 1/2, R 1
    assert token_f1("blue square", "red circle") == 0.0
    assert token_f1("", "the") == 1.0  # both empty after normalisation
    assert token_f1("the", "red") == 0.0


def test_text_metrics_and_most_frequent_baseline():
    assert most_frequent_answer(["zeta", "alpha"]) == "alpha"  # tie: alphabetical
    assert most_frequent_answer(["b", "a", "B."]) == "b"
    got = text_metrics(["a red circle", "big blue", "hello"],
                       ["red circle", "blue square", "Red circle"])
    assert got == pytest.approx({"em": 1 / 3, "f1": 0.5, "baseline_em": 2 / 3,
                                 "baseline_f1": 2 / 3, "n": 3})
    assert text_metrics([], []) == {"n": 0}
    with pytest.raises(ValueError, match="2 predictions for 1 answers"):
        text_metrics(["a", "b"], ["a"])


META = {"height": 400, "width": 800, "caption": "two shapes and a word.",
        "regions": [{"box": [0, 0, 200, 200], "caption": "a red circle", "label": "circle",
                     "score": 1.0},
                    {"box": [400, 200, 800, 400], "caption": "a red circle", "label": "circle",
                     "score": 1.0},
                    {"box": [200, 0, 400, 100], "caption": "a blue square", "label": "square",
                     "score": 1.0}],
        "ocr": [{"box": [600, 0, 800, 40], "text": "hello"}]}


def test_eval_questions_are_fixed_per_image():
    codec = BoxCodec()
    kwargs = dict(original_hw=(400, 800), resized_hw=(56, 112), codec=codec, seed=3)
    questions = eval_questions(META, key="k0", **kwargs)
    assert [q.kind for q in questions] == [CAPTION_TO_BBOX, BBOX_TO_CAPTION, BBOX_TO_OCR]
    grounding, caption, ocr = questions
    # grounding only asks for the caption naming one region
    assert grounding.question == PARAPHRASES[CAPTION_TO_BBOX][0].format(text="a blue square")
    assert grounding.box == (250, 0, 500, 250) and grounding.truth == "[250, 0, 500, 250]"
    regions = {(PARAPHRASES[BBOX_TO_CAPTION][0].format(box=box), text) for box, text in (
        ("[0, 0, 250, 500]", "a red circle"), ("[500, 500, 1000, 1000]", "a red circle"),
        ("[250, 0, 500, 250]", "a blue square"))}
    assert (caption.question, caption.truth) in regions and caption.box is None
    assert ocr.question == PARAPHRASES[BBOX_TO_OCR][0].format(box="[750, 0, 1000, 100]")
    assert ocr.truth == "hello"
    assert eval_questions(META, key="k0", **kwargs) == questions
    # eval_kinds: a subset asks only those kinds, and draws the same questions for them
    assert eval_questions(META, key="k0", kinds=[BBOX_TO_CAPTION, BBOX_TO_OCR],
                          **kwargs) == [caption, ocr]
    # the region asked about depends on the sample key (and seed): every one comes up
    asked = {(q.question, q.truth) for i in range(24)
             for q in eval_questions(META, key=f"k{i}", **kwargs)[1:2]}
    assert asked == regions
    no_ocr = eval_questions({**META, "ocr": []}, key="k0", **kwargs)
    assert [q.kind for q in no_ocr] == [CAPTION_TO_BBOX, BBOX_TO_CAPTION]


def test_align_metrics_scores_every_kind():
    codec = BoxCodec()
    questions = eval_questions(META, key="k0", original_hw=(400, 800), resized_hw=(56, 112),
                               codec=codec, seed=3)
    perfect = [EvalAnswer(q.kind, q.truth, q.box, (56, 112), q.truth) for q in questions]
    wrong = [EvalAnswer(q.kind, q.truth, q.box, (56, 112), "no idea") for q in questions]
    got = align_metrics(perfect + wrong, codec, skipped=2)
    assert got == {"grounding_acc": 0.5, "grounding_baseline": 1.0,
                   "grounding_parse_failures": 1.0, "grounding_n": 2.0,
                   "region_caption_em": 0.5, "region_caption_f1": 0.5,
                   "region_caption_baseline_em": 1.0, "region_caption_baseline_f1": 1.0,
                   "region_caption_n": 2.0, "ocr_em": 0.5, "ocr_f1": 0.5, "ocr_baseline_em": 1.0,
                   "ocr_baseline_f1": 1.0, "ocr_n": 2.0, "eval_skipped": 2.0}
    assert align_metrics([], codec, skipped=0) == {"grounding_n": 0.0, "region_caption_n": 0.0,
                                                    "ocr_n": 0.0, "eval_skipped": 0.0}
