"""Training losses: Stage I masked feature regression (Eq. 1) and Stage II sigmoid contrastive
loss across data-parallel ranks (Eq. 2)."""

from megatron_finevit.losses.mim import MIMLossOutput, mim_loss, normalize_teacher_features
from megatron_finevit.losses.siglip import SigLIPLoss

__all__ = ["MIMLossOutput", "SigLIPLoss", "mim_loss", "normalize_teacher_features"]
