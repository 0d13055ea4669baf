"""DINOv3 teacher: a tiny random DINOv3 checkpoint saved with transformers, loaded through
``DINOv3Teacher``, compared with transformers' own forward on the resized image; patch-grid
alignment and order against the student's patchifier; frozen / eval / no-grad; the zarr cache."""

import json

import pytest
import torch
import torch.nn.functional as F

from megatron_finevit.data.decode_pil import Normalization
from megatron_finevit.models.teacher import (
    DINOv3Teacher,
    StaleTeacherCacheError,
    TeacherFeatureCache,
    checkpoint_fingerprint,
    to_merge_window_order,
)

TEACHER_PATCH = 16
TEACHER_NORM = Normalization(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))  # in preprocessor_config
GRIDS = [(2, 2), (4, 6), (6, 2), (8, 4)]  # student patch grids (rows, cols), non-square too


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(patch_size=TEACHER_PATCH, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=2, num_register_tokens=4,
                             image_size=64)
    model = DINOv3ViTModel(config)
    with torch.no_grad():  # make the CLS / register tokens and final norm non-trivial
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("dinov3")
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": list(TEACHER_NORM.mean), "image_std": list(TEACHER_NORM.std)}))
    return path


@pytest.fixture(scope="module")
def teacher(checkpoint):
    return DINOv3Teacher.from_pretrained(checkpoint)


def _student_images(grids, seed=0):
    """Pixels in [0, 1] and the same images normalised the student's way (CLIP statistics)."""
    gen = torch.Generator().manual_seed(seed)
    raw = [torch.rand(3, gh * 14, gw * 14, generator=gen) for gh, gw in grids]
    norm = Normalization()
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (norm.mean, norm.std))
    return raw, [(x - mean) / std for x in raw]


def _naive_merge_window_order(grid):
    gh, gw, _ = grid.shape
    rows = []
    for wr in range(gh // 2):
        for wc in range(gw // 2):
            for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
                rows.append(grid[2 * wr + dr, 2 * wc + dc])
    return torch.stack(rows)


def test_merge_window_order_matches_naive_and_student_patchifier():
    from megatron_finevit.models.vit.patch_embed import image_to_patches

    for gh, gw in GRIDS:
        grid = torch.randn(gh, gw, 5)
        assert torch.equal(to_merge_window_order(grid), _naive_merge_window_order(grid))
        # The student's own patchifier on an image whose patch (r, c) is filled with r·gw + c.
        ids = torch.arange(gh * gw, dtype=torch.float32).view(gh, gw)
        image = ids.repeat_interleave(14, 0).repeat_interleave(14, 1).expand(3, -1, -1)
        student_order = image_to_patches(image)[0][:, 0]
        assert torch.equal(to_merge_window_order(ids[..., None])[:, 0], student_order)
    with pytest.raises(ValueError, match="merge window"):
        to_merge_window_order(torch.zeros(3, 4, 2))


def test_features_equal_transformers_forward(checkpoint, teacher):
    from transformers import DINOv3ViTModel

    reference = DINOv3ViTModel.from_pretrained(checkpoint).eval()
    raw, images = _student_images(GRIDS + [(4, 6)])  # a repeated size: batched together
    got = teacher.features(images)
    t_mean, t_std = (torch.tensor(v).view(3, 1, 1) for v in (TEACHER_NORM.mean, TEACHER_NORM.std))
    for x, feats, (gh, gw) in zip(raw, got, GRIDS + [(4, 6)]):
        size = (gh * TEACHER_PATCH, gw * TEACHER_PATCH)
        pixels = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            hidden = reference(pixel_values=(pixels - t_mean) / t_std).last_hidden_state[0]
        assert hidden.shape[0] == 1 + 4 + gh * gw  # CLS + 4 registers + patches
        want = _naive_merge_window_order(hidden[5:].reshape(gh, gw, -1))
        # Grid alignment: as many teacher patches as the student has (14-px patches).
        assert feats.shape == (x.shape[1] // 14 * x.shape[2] // 14, 32)
        torch.testing.assert_close(feats, want, rtol=1e-5, atol=1e-5)


def test_frozen_eval_no_grad(teacher):
    assert all(not p.requires_grad for p in teacher.parameters())
    parent = torch.nn.Sequential(teacher)
    parent.train()  # a training loop's model.train() must not reach the teacher
    assert not teacher.training and not teacher.model.training
    _, images = _student_images([(4, 6)], seed=3)
    images = [images[0].requires_grad_()]
    with torch.enable_grad():
        first = teacher.features(images)[0]
    assert not first.requires_grad and first.grad_fn is None
    # Eval mode also means no RoPE coordinate jitter: the same input gives the same features.
    assert torch.equal(first, teacher.features(images)[0])


def test_rejects_bad_inputs(tmp_path, teacher):
    with pytest.raises(ValueError, match="multiples of 28"):
        teacher.features([torch.zeros(3, 28, 30)])
    with pytest.raises(FileNotFoundError, match="config.json"):
        DINOv3Teacher.from_pretrained(tmp_path)


def test_feature_cache(tmp_path, checkpoint, teacher):
    _, images = _student_images([(2, 2), (4, 6), (2, 4)], seed=5)
    keys = ["shard-0/000001", "shard-0/000002", "__odd key"]
    cache = TeacherFeatureCache(tmp_path / "cache.zarr", teacher.cache_signature())
    calls = []
    handle = teacher.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = teacher.cached_features(images, keys, cache)
        assert len(calls) == 3  # three sizes, three forwards
        reopened = TeacherFeatureCache(tmp_path / "cache.zarr", teacher.cache_signature())
        second = teacher.cached_features(images, keys, reopened)
        assert len(calls) == 3  # all hits
    finally:
        handle.remove()
    for a, b, direct in zip(first, second, teacher.features(images)):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, direct, rtol=2e-3, atol=2e-3)  # float16 storage
    # A different student grid for a known key is a miss, not a wrong target.
    assert reopened.get(keys[0], (4, 4)) is None
    # A different teacher (or resize rule, statistics...) is refused.
    stale = dict(teacher.cache_signature(), teacher_fingerprint="another checkpoint")
    with pytest.raises(StaleTeacherCacheError, match="teacher_fingerprint"):
        TeacherFeatureCache(tmp_path / "cache.zarr", stale)


def test_fingerprint_tracks_weights(tmp_path, checkpoint):
    from transformers import DINOv3ViTModel

    model = DINOv3ViTModel.from_pretrained(checkpoint)
    model.save_pretrained(tmp_path / "same")
    with torch.no_grad():
        model.norm.weight[0] += 1e-3
    model.save_pretrained(tmp_path / "changed")
    assert checkpoint_fingerprint(tmp_path / "same") == checkpoint_fingerprint(checkpoint)
    assert checkpoint_fingerprint(tmp_path / "changed") != checkpoint_fingerprint(checkpoint)
