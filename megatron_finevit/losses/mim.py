"""Stage I masked-image-modelling loss (paper §3.2, Eq. 1).

    L_MIM = Σ_{i ∈ M} ‖Φ(x)_i − T(x)_i‖²₂

``Φ(x)_i`` is the student's prediction for patch ``i`` (the MIM head's output, already at the
teacher's width), ``T(x)_i`` the frozen teacher's feature for the same patch (same
merge-window-major order, see ``models.teacher``) and ``M`` the masked patches.

Target normalisation (``normalize_target=True``): each teacher token is standardised over its
feature dimension — a LayerNorm without affine parameters, ``(T_i − mean(T_i)) / sqrt(var(T_i) +
1e-6)`` — before the regression, as feature-regression MIM methods do (EVA, MaskFeat, MAE's
per-patch normalisation). DINOv3's output already passes through its final LayerNorm, but that
norm's learned per-channel scale and shift make the target's magnitude teacher-dependent;
standardising removes them, so a zero prediction costs ``d`` per token (up to the eps) whatever the
teacher. Eq. 1 itself regresses the raw features
(``normalize_target=False``); the paper does not say which it used.

The sum is returned together with the masked-token count, so the trainer can normalise over all
masked tokens of the global batch (Megatron's ``calculate_per_token_loss``) or report the
per-token mean.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

TARGET_NORM_EPS = 1e-6


class MIMLossOutput(NamedTuple):
    """loss: float32 scalar Σ over masked tokens of the squared error (differentiable).
    num_masked: int64 scalar, the number of masked tokens.
    mean_per_token: float32 scalar ``loss / num_masked`` (detached, 0 when nothing is masked),
    for logging."""

    loss: torch.Tensor
    num_masked: torch.Tensor
    mean_per_token: torch.Tensor


def normalize_teacher_features(teacher: torch.Tensor) -> torch.Tensor:
    """``[t, d]`` -> ``[t, d]`` float32, each token standardised over ``d`` (LayerNorm without
    affine, eps 1e-6)."""
    return F.layer_norm(teacher.float(), teacher.shape[-1:], eps=TARGET_NORM_EPS)


def mim_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *,
             normalize_target: bool) -> MIMLossOutput:
    """Eq. 1 over one rank's tokens.

    Args:
        student: ``[t, d]`` predictions (any float dtype; the loss is computed in float32).
        teacher: ``[t, d]`` teacher features for the same tokens (no gradient flows into it).
        mask: ``[t]`` bool, True where the patch was masked (only those count).
        normalize_target: standardise each teacher token first (see the module docstring).
    """
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         f"must both be [tokens, dim]")
    if mask.dtype != torch.bool or mask.shape != student.shape[:1]:
        raise ValueError(f"mask must be bool [{student.shape[0]}], got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    target = teacher.detach()
    target = normalize_teacher_features(target) if normalize_target else target.float()
    # Select before subtracting: only masked tokens enter the graph (25% of the work saved).
    diff = student[mask].float() - target[mask]
    loss = diff.square().sum()
    num_masked = mask.sum()
    mean = (loss.detach() / num_masked.clamp(min=1)).float()
    return MIMLossOutput(loss, num_masked, mean)
