"""Short-answer VQA scoring: exact match of normalised answers, per question kind and overall,
beside the majority-answer baseline a model must beat to have learnt more than the answer
distribution.

Normalisation (``normalize_vqa_answer``): SQuAD's (lowercase, punctuation and the articles a /
an / the removed, whitespace collapsed) and number words written as digits ("Three." → "3",
"twelve shapes" → "12 shapes"), so "There are three" does not match "3" but "three" does.

Baseline: per kind, the most frequent normalised reference answer over the evaluated questions
(ties: the alphabetically first) answered to every question of that kind; the overall baseline
is its accuracy over all questions. Keys (``vqa_metrics``): ``acc``, ``baseline``, ``n`` and
``acc_<kind>``, ``baseline_<kind>``, ``n_<kind>`` for each kind present; with no question only
``{"n": 0}`` (a rate of nothing is undefined, and a 0 would read as a result).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from megatron_finevit.evaluation.region_qa import most_frequent_answer, normalize_answer

NUMBER_WORDS = {word: str(value) for value, word in enumerate(
    ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
     "fifteen sixteen seventeen eighteen nineteen twenty").split())}


def normalize_vqa_answer(text: str) -> str:
    """``normalize_answer`` with number words 0..20 as digits (module doc)."""
    return " ".join(NUMBER_WORDS.get(word, word) for word in normalize_answer(text).split())


def vqa_metrics(kinds: Sequence[str], predictions: Sequence[str],
                truths: Sequence[str]) -> dict[str, float]:
    """Accuracy and majority baseline per kind and overall (module doc); the three sequences
    are paired, one entry per question."""
    if not len(kinds) == len(predictions) == len(truths):
        raise ValueError(f"{len(kinds)} kinds, {len(predictions)} predictions and {len(truths)} "
                         "answers: one each per question")
    if not truths:
        return {"n": 0}
    by_kind: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for kind, prediction, truth in zip(kinds, predictions, truths):
        by_kind[kind].append((normalize_vqa_answer(prediction), normalize_vqa_answer(truth)))
    results, hits, baseline_hits = {}, 0, 0
    for kind in sorted(by_kind):
        pairs = by_kind[kind]
        majority = most_frequent_answer([truth for _, truth in pairs])
        kind_hits = sum(prediction == truth for prediction, truth in pairs)
        kind_baseline = sum(majority == truth for _, truth in pairs)
        results.update({f"acc_{kind}": kind_hits / len(pairs),
                        f"baseline_{kind}": kind_baseline / len(pairs), f"n_{kind}": len(pairs)})
        hits += kind_hits
        baseline_hits += kind_baseline
    n = len(truths)
    return {"acc": hits / n, "baseline": baseline_hits / n, "n": n, **results}
