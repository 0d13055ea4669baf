"""Stage I loss (Eq. 1) against a per-token numpy loop, with and without target normalisation."""

import numpy as np
import pytest
import torch

from megatron_finevit.losses import mim_loss, normalize_teacher_features
from megatron_finevit.losses.mim import TARGET_NORM_EPS


def _brute_force(student, teacher, mask, normalize):
    """Σ over masked tokens of ‖s_i − T_i‖², one token at a time, in float64 numpy."""
    s, t = student.detach().double().numpy(), teacher.detach().double().numpy()
    total = 0.0
    for i in range(len(s)):
        if not mask[i]:
            continue
        target = t[i]
        if normalize:
            target = (target - target.mean()) / np.sqrt(target.var() + TARGET_NORM_EPS)
        total += float(((s[i] - target) ** 2).sum())
    return total


def _inputs(tokens=37, dim=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(tokens, dim, generator=gen)
    # Teacher features with per-channel scale and offset, as a LayerNorm with affine leaves them.
    teacher = torch.randn(tokens, dim, generator=gen) * torch.linspace(0.1, 5, dim) + 3.0
    mask = torch.rand(tokens, generator=gen) < 0.75
    return student, teacher, mask


@pytest.mark.parametrize("normalize", [False, True])
def test_matches_per_token_loop_and_gradient(normalize):
    student, teacher, mask = _inputs()
    leaf = student.clone().requires_grad_()
    out = mim_loss(leaf, teacher, mask, normalize_target=normalize)
    want = _brute_force(student, teacher, mask, normalize)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    assert out.num_masked.item() == int(mask.sum())
    assert out.mean_per_token.item() == pytest.approx(want / int(mask.sum()), rel=1e-5)
    out.loss.backward()
    target = normalize_teacher_features(teacher) if normalize else teacher
    # d/ds ‖s − T‖² = 2 (s − T) on masked tokens, 0 elsewhere.
    want_grad = torch.where(mask[:, None], 2 * (student - target), torch.zeros(()))
    torch.testing.assert_close(leaf.grad, want_grad, rtol=1e-5, atol=1e-6)


def test_normalised_targets_are_standardised_per_token():
    _, teacher, _ = _inputs()
    target = normalize_teacher_features(teacher)
    torch.testing.assert_close(target.mean(-1), torch.zeros(len(teacher)), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.var(-1, unbiased=False), torch.ones(len(teacher)),
                               atol=1e-4, rtol=0)
    # A zero prediction then costs ~dim per masked token whatever the teacher's scale.
    student, _, mask = _inputs()
    zero = mim_loss(torch.zeros_like(student), teacher * 100, mask, normalize_target=True)
    assert zero.mean_per_token.item() == pytest.approx(teacher.shape[1], rel=1e-4)


def test_teacher_gets_no_gradient_and_empty_mask():
    student, teacher, _ = _inputs()
    teacher = teacher.clone().requires_grad_()
    leaf = student.bfloat16().requires_grad_()
    none = torch.zeros(len(student), dtype=torch.bool)
    out = mim_loss(leaf, teacher, none, normalize_target=False)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.num_masked.item() == 0 and out.mean_per_token.item() == 0
    assert teacher.grad is None
    assert leaf.grad.dtype == torch.bfloat16 and not leaf.grad.any()


def test_bad_shapes_raise():
    student, teacher, mask = _inputs()
    with pytest.raises(ValueError, match="tokens, dim"):
        mim_loss(student, teacher[:, :-1], mask, normalize_target=False)
    with pytest.raises(ValueError, match="mask must be bool"):
        mim_loss(student, teacher, mask.long(), normalize_target=False)
