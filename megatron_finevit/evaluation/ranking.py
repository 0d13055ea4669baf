"""Ranking primitives shared by zero-shot classification and retrieval.

A query (an image against class prompts, a caption against images, an image against captions)
scores every candidate; some candidates are correct. Its **rank** is the number of wrong
candidates scoring at least as high as its best correct one, so a hit at ``k`` means
``rank < k``. Ties count against the query (a model that scores everything alike gets no
credit), and with distinct scores this is exactly the position of the first correct candidate
in a descending sort.
"""

from __future__ import annotations

from typing import Sequence

import torch


def best_positive_rank(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """``scores [n, m]``, ``positive [n, m] bool`` (each row has at least one True) -> int64
    ``[n]`` ranks as defined in the module docstring."""
    if scores.shape != positive.shape or positive.dtype != torch.bool:
        raise ValueError(f"scores {tuple(scores.shape)} and a bool positive mask "
                         f"{tuple(positive.shape)} must have the same shape")
    if not positive.any(dim=1).all():
        raise ValueError("every query needs at least one correct candidate")
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    return ((scores >= best) & ~positive).sum(dim=1)


def hits_at_k(ranks: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """int64 ``[len(ks)]``: how many of ``ranks`` are below each ``k``."""
    return torch.stack([(ranks < k).sum() for k in ks])


def cosine_scores(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``[n, d] × [m, d] -> [n, m]`` cosine similarities in float32. (SigLIP's logits
    ``t·cos + b`` are an increasing function of these, so the ranks are the same.)"""
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    c = torch.nn.functional.normalize(candidates.float(), dim=-1)
    return q @ c.T
