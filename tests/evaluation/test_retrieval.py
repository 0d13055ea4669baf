"""Retrieval recall against a brute-force numpy ranking (argsort of every query's scores)."""

import numpy as np
import pytest
import torch

from megatron_finevit.evaluation import retrieval_recall

KS = (1, 5, 10)


def _brute_force(image_emb, text_emb, text_image, ks=KS):
    img = image_emb.double().numpy()
    txt = text_emb.double().numpy()
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    owner = text_image.numpy()
    out = {}
    for k in ks:
        t2i = [owner[j] in np.argsort(-(img @ txt[j]))[:k] for j in range(len(txt))]
        i2t = [np.isin(owner[np.argsort(-(txt @ img[i]))[:k]], [i]).any() for i in range(len(img))]
        out[f"t2i_r{k}"] = float(np.mean(t2i))
        out[f"i2t_r{k}"] = float(np.mean(i2t))
    return out


def _dataset(n_images=40, seed=0, noise=2.5, dim=16):
    """Images with 1-5 captions each (captions = image + noise), captions shuffled."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(n_images, dim, generator=gen)
    per_image = torch.randint(1, 6, (n_images,), generator=gen)
    owner = torch.repeat_interleave(torch.arange(n_images), per_image)
    owner = owner[torch.randperm(len(owner), generator=gen)]
    text = image[owner] + noise * torch.randn(len(owner), dim, generator=gen)
    return image, text, owner


@pytest.mark.parametrize("chunk", [7, 1024])
def test_matches_brute_force_with_several_captions_per_image(chunk):
    image, text, owner = _dataset()
    got = retrieval_recall(image, text, owner, chunk=chunk)
    want = _brute_force(image, text, owner)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got["t2i_r1"] < got["t2i_r10"] < 1 and 0 < got["i2t_r1"] < 1  # non-trivial


def test_perfect_and_tied_embeddings():
    image, _, _ = _dataset(n_images=12)
    owner = torch.arange(12)
    assert set(retrieval_recall(image, image * 3.0, owner).values()) == {1.0}
    # Everything scores alike: ties count against the query, so a hit needs k >= 12 wrong
    # candidates + 1 (t2i has 11 wrong images: R@k = 1 only for k = 12 or more).
    same = torch.ones(12, 4)
    got = retrieval_recall(same, same, owner, ks=(1, 11, 12))
    assert (got["t2i_r1"], got["t2i_r11"], got["t2i_r12"]) == (0.0, 0.0, 1.0)


def test_bad_inputs_raise():
    image, text, owner = _dataset(n_images=5)
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_recall(torch.cat([image, image[:1]]), text, owner)
    with pytest.raises(ValueError, match=r"in \[0, 5\)"):
        retrieval_recall(image, text, owner + 1)
    with pytest.raises(ValueError, match="one image index per caption"):
        retrieval_recall(image, text, owner[:-1])
