"""FineViT: a native-resolution ViT built from megatron-core layers (paper §3.1, Table 1).

patches ``[t, C·14·14]`` -> ``PatchEmbedding`` -> (optional MIM mask token) -> megatron
``TransformerBlock`` (pre-norm RMSNorm, SwiGLU, bidirectional attention within each image of the
THD pack, 2D RoPE) -> final RMSNorm -> ``[t, 1, hidden]``. No class token.

Pipeline parallelism: ``pre_process`` stages own the patch embedding (and mask token),
``post_process`` stages the final norm; every stage gets the same ``forward`` arguments (the
layout is needed for RoPE and attention everywhere) and megatron's schedule feeds the hidden states
between stages through ``set_input_tensor``.

Output layout (``post_process``): ``[t, 1, hidden]`` — this CP rank's rows of the padded pack in
the CP layout (``t = T / cp``), gathered over the TP group under sequence parallelism, so heads
see whole tokens replicated across TP; padding rows carry values but no meaning.
``EncoderInput.gather_output`` turns it into the real tokens of the whole pack ``[N, hidden]``.
Intermediate pipeline stages return the block's raw output (``[t / tp, 1, hidden]`` under SP).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from megatron_finevit.config.vit import FineViTConfig
from megatron_finevit.models.heads.mim import MaskToken
from megatron_finevit.models.specs import transformer_block_spec
from megatron_finevit.models.vit.patch_embed import PatchEmbedding
from megatron_finevit.models.vit.rope2d import packed_rope_freqs


class FineViTModel(MegatronModule):
    """The encoder for this pipeline stage.

    Args:
        vit: architecture (``FineViTConfig``); ``config`` its megatron ``TransformerConfig``
            (``vit.to_transformer_config(...)``).
        pre_process / post_process: first / last pipeline stage (default: from parallel_state).
        mask_token: build the learned MIM mask token (Stage I).
    """

    def __init__(self, vit: FineViTConfig, config, pre_process: bool | None = None,
                 post_process: bool | None = None, mask_token: bool = False,
                 vp_stage: int | None = None):
        super().__init__(config=config)
        self.vit = vit
        # megatron's schedules and finalize_model_grads read these
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        stage = dict(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
        self.pre_process = (parallel_state.is_pipeline_first_stage(**stage) if pre_process is None
                            else pre_process)
        self.post_process = (parallel_state.is_pipeline_last_stage(**stage) if post_process is None
                             else post_process)
        if self.pre_process:
            self.patch_embed = PatchEmbedding(config, vit.patch_dim)
            self.mask_token = MaskToken(config) if mask_token else None
        self.decoder = TransformerBlock(
            config=config,
            spec=transformer_block_spec(config, vit.spec_backend, AttnMaskType.no_mask,
                                        vp_stage=vp_stage),
            pre_process=self.pre_process,
            post_process=self.post_process,
            vp_stage=vp_stage,
        )

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first receive their input here (megatron's schedule)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, patches: torch.Tensor, cu_seqlens: torch.Tensor, grids: torch.Tensor,
                cu_seqlens_padded: torch.Tensor | None = None,
                masked: torch.Tensor | None = None) -> torch.Tensor:
        """Encode this rank's rows of a THD pack (see ``layout.prepare_encoder_input``).

        Args:
            patches: ``[t, C·p·p]`` this CP rank's patch rows (ignored after the first stage).
            cu_seqlens: int32 ``[m + 1]`` global boundaries of real tokens.
            grids: int64 ``[n, 2]`` patch grid of each image (the first ``n`` segments).
            cu_seqlens_padded: int32 ``[m + 1]`` global padded boundaries (``None``: unpadded).
            masked: bool ``[t]`` patches replaced by the mask token (needs ``mask_token``).

        Returns ``[t, 1, hidden]`` (see the module docstring for the layout).
        """
        packed_seq_params = self._packed_seq_params(cu_seqlens, cu_seqlens_padded, patches.device)
        rotary = packed_rope_freqs(grids, cu_seqlens, self.vit.head_dim, self.vit.rope_theta,
                                   self.vit.merge_size, cu_seqlens_padded).to(patches.device)
        hidden = self._embed(patches, masked) if self.pre_process else None
        hidden = self.decoder(hidden, attention_mask=None, rotary_pos_emb=rotary,
                              packed_seq_params=packed_seq_params)
        if self.post_process and self.config.sequence_parallel:
            # Heads take whole tokens replicated over TP; their column-parallel inputs all-reduce
            # the gradient, so the backward of this gather is a plain split.
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False)
        return hidden

    def _embed(self, patches: torch.Tensor, masked: torch.Tensor | None) -> torch.Tensor:
        if self.config.sequence_parallel:  # each TP rank embeds only its slice of the tokens
            patches = _sequence_slice(patches)
            masked = _sequence_slice(masked) if masked is not None else None
        hidden = self.patch_embed(patches)  # [t (/ tp), 1, h]
        if masked is not None:
            if self.mask_token is None:
                raise ValueError("masked patches given but the model was built without "
                                 "mask_token=True")
            hidden = self.mask_token(hidden, masked)
        return hidden

    @staticmethod
    def _packed_seq_params(cu_seqlens, cu_seqlens_padded, device) -> PackedSeqParams:
        cu = cu_seqlens.to(device=device, dtype=torch.int32)
        padded = (cu_seqlens_padded.to(device=device, dtype=torch.int32)
                  if cu_seqlens_padded is not None else None)
        bounds = cu if padded is None else padded
        max_len = int((bounds[1:] - bounds[:-1]).max())
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                               cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
                               max_seqlen_q=max_len, max_seqlen_kv=max_len)


def _sequence_slice(tensor: torch.Tensor) -> torch.Tensor:
    """This TP rank's contiguous share of dim 0 (megatron's sequence-parallel split)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    if tensor.shape[0] % tp:
        raise ValueError(f"{tensor.shape[0]} tokens do not split over {tp} sequence-parallel "
                         "ranks: lay the pack out with prepare_encoder_input(sp_size=tp)")
    return tensor.chunk(tp, dim=0)[rank]
