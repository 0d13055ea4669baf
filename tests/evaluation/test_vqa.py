"""VQA scoring (``evaluation.vqa``): answer normalisation, accuracy per kind and overall, and the
majority-answer baseline, against hand-computed values."""

import pytest

from megatron_finevit.evaluation.vqa import normalize_vqa_answer, vqa_metrics


@pytest.mark.parametrize("text, expected", [
    ("Three.", "3"), ("3", "3"), (" 3 ", "3"), ("zero", "0"), ("Twenty", "20"),
    ("twelve shapes", "12 shapes"), ("There are three", "there are 3"),
    ("The Red.", "red"), ("an orange", "orange"), ("DELTA!", "delta"), ("twenty-one", "twentyone"),
    ("", ""),
])
def test_normalisation(text, expected):
    assert normalize_vqa_answer(text) == expected


def test_accuracy_and_majority_baseline_per_kind_and_overall():
    kinds = ["count"] * 4 + ["color"] * 3 + ["read"] * 2
    truths = ["3", "3", "2", "1", "red", "blue", "blue", "DELTA", "OMEGA"]
    predictions = ["three", "3.", "3", "one", "Red", "the blue", "red", "delta", "ALPHA"]
    results = vqa_metrics(kinds, predictions, truths)
    # count: hits 3/4 (three, 3., one); majority "3" is right on 2 of 4.
    # color: hits 2/3 (Red, the blue); majority "blue" right on 2 of 3.
    # read: hits 1/2; majority: a tie of "delta" / "omega" -> the alphabetically first, 1 of 2.
    assert results == {
        "acc": 6 / 9, "baseline": 5 / 9, "n": 9,
        "acc_count": 3 / 4, "baseline_count": 2 / 4, "n_count": 4,
        "acc_color": 2 / 3, "baseline_color": 2 / 3, "n_color": 3,
        "acc_read": 1 / 2, "baseline_read": 1 / 2, "n_read": 2}


def test_baseline_is_taken_per_kind_not_over_all_questions():
    # Over all questions "2" is the most frequent answer; per kind, colour's majority is "red".
    kinds = ["count", "count", "count", "color", "color"]
    truths = ["2", "2", "2", "red", "red"]
    results = vqa_metrics(kinds, ["x"] * 5, truths)
    assert results["baseline"] == 1.0 and results["acc"] == 0.0
    assert results["baseline_color"] == 1.0


def test_number_words_in_references_count_as_digits():
    results = vqa_metrics(["count", "count"], ["2", "four"], ["two", "4"])
    assert results["acc"] == 1.0
    assert results["baseline_count"] == 0.5  # "2" and "4" tie: "2" wins, right once


def test_empty_and_mismatched_inputs():
    assert vqa_metrics([], [], []) == {"n": 0}
    with pytest.raises(ValueError, match="one each per question"):
        vqa_metrics(["count"], ["3", "4"], ["3"])
