"""Heads on the FineViT encoder (one rank): output shapes, per-image isolation inside a pack, and
each head against a by-hand computation from its own weights. Their tensor-parallel behaviour is
checked in test_vit_parallel.py (the parity model carries all three heads)."""

import pytest
import torch

from megatron_finevit.models.heads import segment_attention
from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.vit_parity import LLM_DIM, TEACHER_DIM, TEXT_DIM, head_checks

TOL = 1e-5


@pytest.fixture(scope="module")
def report():
    (result,) = run_world(head_checks, 1)
    return result


def test_shapes(report):
    # 4 images of 24 + 4 + 12 + 8 tokens
    assert report["shapes"] == {"mim": [48, TEACHER_DIM], "map": [4, TEXT_DIM],
                                "proj": [12, LLM_DIM]}


def test_images_do_not_see_each_other(report):
    assert report["isolation_map_others"] == 0.0
    assert report["isolation_proj_others"] == 0.0
    assert report["isolation_map_changed"] > 1e-4
    assert report["isolation_proj_changed"] > 1e-4


@pytest.mark.parametrize("head", ["map", "proj", "mim"])
def test_head_matches_by_hand_computation(report, head):
    assert report[f"{head}_vs_reference"] <= TOL


def test_projector_refuses_images_that_are_not_whole_merge_windows(report):
    assert "multiple of 4 tokens" in report["projector_error"]


def test_segment_attention_equals_per_segment_softmax():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9]
    k, v = (torch.randn(15, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    q = torch.randn(3, 2, 4, generator=g, dtype=torch.float64) * 10  # large scores: stability
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    got = segment_attention(q, k, v, ids, 3, scale=0.5)
    for i, (ks, vs) in enumerate(zip(k.split(lengths), v.split(lengths))):
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q[i], ks) * 0.5, dim=-1)
        torch.testing.assert_close(got[i], torch.einsum("hn,nhd->hd", weights, vs))
