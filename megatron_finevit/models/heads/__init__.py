"""Heads on the FineViT encoder: MIM regression (+ mask token), MAP pooling to the text width,
and the 2×2 merge projector to the LLM width. All tensor-parallel aware; all take the encoder's
real tokens ``[N, hidden]`` in pack order (``EncoderInput.gather_output``)."""

from megatron_finevit.models.heads.map_pool import MAPHead, segment_attention
from megatron_finevit.models.heads.merge_projector import MergeProjector
from megatron_finevit.models.heads.mim import MaskToken, MIMHead

__all__ = ["MAPHead", "MaskToken", "MergeProjector", "MIMHead", "segment_attention"]
