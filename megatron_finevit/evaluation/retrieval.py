"""Image ↔ text retrieval recall (paper §4: COCO, Flickr30k, DCI, IIW, Urban-1k; R@1/5/10).

An image may have several captions (COCO has five): ``text_image[j]`` is the index of the image
caption ``j`` describes.

- text → image: each caption is a query over all images; correct = its image.
- image → text: each image is a query over all captions; correct = any of its captions (the best
  ranked one counts).

Scores are cosine similarities (``evaluation.ranking``: ties count against the query). The score
matrix is built ``chunk`` queries at a time, so memory is ``chunk × candidates``.

During training each data-parallel rank embeds a shard of the evaluation set; ``gather_rows``
assembles the whole set (shards may differ in size) before calling ``retrieval_recall``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from megatron_finevit.evaluation.ranking import best_positive_rank, cosine_scores, hits_at_k


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """``image_emb [n_img, d]``, ``text_emb [n_txt, d]``, ``text_image [n_txt]`` int ->
    ``{"t2i_r1": …, "i2t_r1": …, …}`` recalls in [0, 1] for every ``k`` in ``ks``."""
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    text_image = text_image.to(torch.long)
    if text_image.shape != (n_txt,) or n_txt == 0:
        raise ValueError(f"text_image must have one image index per caption ({n_txt}), "
                         f"got shape {tuple(text_image.shape)}")
    if text_image.min() < 0 or text_image.max() >= n_img:
        raise ValueError(f"caption image indices must be in [0, {n_img})")
    if torch.bincount(text_image, minlength=n_img).min() == 0:
        raise ValueError("every image needs at least one caption")
    images = torch.arange(n_img, device=text_image.device)
    t2i = torch.zeros(len(ks), dtype=torch.long)
    for start in range(0, n_txt, chunk):
        scores = cosine_scores(text_emb[start:start + chunk], image_emb)
        positive = text_image[start:start + chunk, None] == images[None]
        t2i += hits_at_k(best_positive_rank(scores, positive), ks).cpu()
    i2t = torch.zeros(len(ks), dtype=torch.long)
    for start in range(0, n_img, chunk):
        scores = cosine_scores(image_emb[start:start + chunk], text_emb)
        positive = images[start:start + chunk, None] == text_image[None]
        i2t += hits_at_k(best_positive_rank(scores, positive), ks).cpu()
    out = {f"t2i_r{k}": hit / n_txt for k, hit in zip(ks, t2i.tolist())}
    out.update({f"i2t_r{k}": hit / n_img for k, hit in zip(ks, i2t.tolist())})
    return out


def gather_rows(local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's ``[n_r, ...]`` rows in rank order (``n_r`` may differ);
    ``group=None`` returns ``local``."""
    if group is None:
        return local
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=local.device), group=group)
    sizes = [int(s) for s in sizes]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[:local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)])
