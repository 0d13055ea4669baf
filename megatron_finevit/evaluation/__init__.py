"""Evaluation: zero-shot classification and image↔text retrieval, during training or standalone."""

from megatron_finevit.evaluation.ranking import best_positive_rank, cosine_scores, hits_at_k
from megatron_finevit.evaluation.retrieval import gather_rows, retrieval_recall
from megatron_finevit.evaluation.zero_shot import (
    DEFAULT_TEMPLATES,
    build_zero_shot_classifier,
    zero_shot_accuracy,
)

__all__ = ["DEFAULT_TEMPLATES", "best_positive_rank", "build_zero_shot_classifier",
           "cosine_scores", "gather_rows", "hits_at_k", "retrieval_recall", "zero_shot_accuracy"]
