"""FineViT-VL in megatron: FineViT encoder -> 2×2 merge projector -> Qwen3 ``GPTModel``.

The prompt holds one image placeholder token (``image_token_id``) per 2×2 merge window of each
image, in pack order; their input embeddings are replaced by the projected image features and
the language model runs on the result through ``GPTModel(decoder_input=...)``. This matches
``megatron_finevit.hf.FineViTVLForConditionalGeneration``.

Parallel layout (``FineViTVLConfig.to_transformer_configs``):

- tensor parallel: both towers and the projector are split; the projector's output and the LM's
  embedding are whole on every TP rank, so the placeholders are filled in before any split;
- sequence parallel: the encoder splits its tokens over TP (``prepare_encoder_input(sp_size=tp)``)
  and gathers them back for the projector; the LM's embedding is built without its own scatter
  and the filled-in embeddings are scattered here, as megatron's LLaVA does;
- pipeline parallel: the encoder and projector live on the first stage with the LM's embedding
  and first layers; later stages hold only LM layers (and the output layer on the last) and take
  their input from megatron's schedule through ``set_input_tensor``; with virtual pipeline stages
  (``vp_stage``) each rank builds one such module per LM chunk, the encoder and projector only in
  the first chunk of the first rank (its ``pre_process``), the output layer in the last chunk of
  the last; layers keep their global numbers in checkpoints;
- context parallel (CP): every CP rank is given the whole micro-batch. The LM's embeddings are
  computed and the placeholders filled on the whole sequence, then each rank keeps its zigzag
  chunks of every segment (``models.attention.context_parallel``: chunks ``r`` and
  ``2·cp − 1 − r``, so every packed segment must be a multiple of ``2·cp`` tokens — the loader
  pads each sample) and runs the LM on them; ``labels``, ``output_mask`` and the ids are split
  the same way, RoPE and attention take the global ``cu_seqlens``. The last stage gathers the
  per-token loss (or logits) back to the whole ``[B, S]`` with a backward that keeps this rank's
  rows, so a loss reduced identically on every CP rank is the single-rank loss, and megatron's
  ×cp loss scaling and DDP's average over DP×CP cancel. The encoder runs with its own CP: each
  rank encodes its zigzag share of the pack's patches (``prepare_encoder_input``, K/V gathered
  in attention) and ``gather_output`` all-gathers the encoder output (backward: sum over CP) for
  the projector, which runs whole on every rank. Not the encoder replicated over the CP group:
  at phase II's budgets (10,240 LLM tokens, 4 encoder patches per image token) the encoder's
  activations would then be the largest on the rank — CP is there to cut memory — and its
  compute would be repeated ``cp`` times; nor whole images per CP rank (Megatron-LM's choice):
  native-resolution images differ in size by orders of magnitude, so one large image would set
  the step time, whereas the zigzag split balances any mix of sizes.

Packed multimodal sequences (Stage III, SFT): several samples — each its image placeholders and
text — share one ``[1, T]`` row up to a fixed token budget ``T``; ``packed_seq_params`` (THD,
one ``cu_seqlens`` segment per sample, the padding tail its own) keeps every sample causal within
itself in the LM (``models/llm/packing``), and the encoder attends within each image as always.
Placeholders are filled in pack order, so the images come in the same order as their samples.
Under SP ``T`` splits over TP; under PP the schedule's ``seq_length`` is ``T``; under CP every
segment is a multiple of ``2·cp``.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from megatron_finevit.config.vlm import FineViTVLConfig
from megatron_finevit.models.attention import cp_partition_index, gather_from_cp
from megatron_finevit.models.heads import MergeProjector
from megatron_finevit.models.llm import build_qwen3
from megatron_finevit.models.llm.masked_output import masked_token_loss, selected_logits
from megatron_finevit.models.llm.packing import check_packed_input
from megatron_finevit.models.vit import FineViTModel, PackedImages, prepare_encoder_input


class FineViTVLModel(MegatronModule):
    """This pipeline stage's FineViT-VL: submodules ``encoder`` (FineViTModel) and ``projector``
    (MergeProjector to the LM width) on the first stage, ``llm`` (Qwen3 GPTModel, this stage's
    layers) everywhere; their checkpoint keys are prefixed accordingly.

    ``vit_transformer_config`` / ``llm_transformer_config`` come from
    ``FineViTVLConfig.to_transformer_configs``. ``pre_process`` / ``post_process`` default to
    whether this rank is the first / last pipeline stage (of chunk ``vp_stage`` under a virtual
    pipeline: megatron's interleaved schedule runs one module per chunk).
    """

    def __init__(self, config: FineViTVLConfig, vit_transformer_config, llm_transformer_config,
                 pre_process: bool | None = None, post_process: bool | None = None,
                 vp_stage: int | None = None):
        super().__init__(config=llm_transformer_config)
        cp_sizes = {c.context_parallel_size for c in (vit_transformer_config,
                                                      llm_transformer_config)}
        if cp_sizes != {parallel_state.get_context_parallel_world_size()}:
            # a tower at CP 1 in a CP world would run replicated while megatron's schedule still
            # scales its loss by the CP size
            raise ValueError(f"the FineViT-VL towers' context_parallel_size {sorted(cp_sizes)} "
                             f"must be the CP world size "
                             f"{parallel_state.get_context_parallel_world_size()}: build them "
                             f"with FineViTVLConfig.to_transformer_configs(context_parallel=)")
        if vit_transformer_config.pipeline_model_parallel_size != 1:
            raise ValueError("the FineViT-VL encoder is not pipelined: build its TransformerConfig "
                             "with FineViTVLConfig.to_transformer_configs")
        self.vl_config = config
        self.vp_stage = vp_stage  # megatron's schedule checks it against the chunk it runs
        stage = dict(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
        self.pre_process = (parallel_state.is_pipeline_first_stage(**stage) if pre_process is None
                            else pre_process)
        self.post_process = (parallel_state.is_pipeline_last_stage(**stage)
                             if post_process is None else post_process)
        self.llm = build_qwen3(config.llm, llm_transformer_config, pre_process=self.pre_process,
                               post_process=self.post_process, vp_stage=vp_stage,
                               scatter_embedding_sequence_parallel=False)
        # megatron's schedules and finalize_model_grads read these
        self.model_type = self.llm.model_type
        self.share_embeddings_and_output_weights = self.llm.share_embeddings_and_output_weights
        # False: the encoder runs under no_grad (a frozen encoder with nothing before it to train)
        self.encoder_trainable = True
        if self.pre_process:
            self.encoder = FineViTModel(config.vit, vit_transformer_config, pre_process=True,
                                        post_process=True)
            self.projector = MergeProjector(vit_transformer_config, config.llm.hidden_size,
                                            config.vit.merge_size)

    def set_input_tensor(self, input_tensor) -> None:
        """Stages after the first receive the LM's hidden states here (megatron's schedule)."""
        self.llm.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        """The tied embedding / output table on the first and last stage (megatron's
        finalize_model_grads all-reduces its gradient between them)."""
        return self.llm.shared_embedding_or_output_weight()

    def image_features(self, images: PackedImages) -> torch.Tensor:
        """The projected image tokens ``[N / 4, llm hidden]``, one row per merge window in pack
        order (whole on every TP and CP rank)."""
        config = self.encoder.config
        layout = prepare_encoder_input(
            images, cp_size=config.context_parallel_size,
            cp_rank=parallel_state.get_context_parallel_rank(),
            sp_size=parallel_state.get_tensor_model_parallel_world_size()
            if config.sequence_parallel else 1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder_trainable):
            hidden = self.encoder(**layout.model_inputs())  # [N / cp (+ CP padding), 1, h]
            hidden = layout.gather_output(  # [N, h]
                hidden, parallel_state.get_context_parallel_group())
        return self.projector(hidden, layout.cu_seqlens[: images.num_images + 1])

    def forward(self, images: PackedImages | None, input_ids: torch.Tensor,
                position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None,
                output_mask: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids`` / ``position_ids`` ``[B, S]`` (``S`` divisible by TP under sequence
        parallelism) -> on the last stage, logits ``[B, S, padded vocab / TP]`` (vocab-parallel;
        causal attention when ``attention_mask`` is None) or, with ``labels`` ``[B, S]``, the
        per-token cross-entropy ``[B, S]`` (megatron's vocab-parallel loss); on other stages, the
        hidden states for the next one. ``images`` is read on the first stage only.
        ``output_mask`` ``[B, S]`` runs the output layer only where it is set
        (``models/llm/masked_output``): with ``labels`` the per-token loss ``[B, S]`` is 0
        elsewhere; without, the logits ``[1, n, padded vocab / TP]`` of the ``n`` set positions
        are returned (in sequence order for ``B = 1``).
        ``image_features`` ``[N / 4, H]``: what ``image_features(images)`` returned for these
        images in an earlier call, used instead of running the encoder again (generation calls
        the model once per new token on the same images); ``images`` is then None.

        Packed (``packed_seq_params``, THD — see the module docstring): ``B = 1``, ``S = T`` the
        pack's budget, ``position_ids`` restarting per segment (checked), the loss per token
        ``[1, T]`` with no term across samples; the caller masks the padding and each sample's
        last token.

        Context parallel: the inputs are the whole ``[B, S]`` on every CP rank (every segment, or
        ``S`` unpacked, a multiple of ``2·cp``) and so are the last stage's outputs (module
        docstring); the hidden states between stages are this rank's ``[S / cp (/ TP), B, H]``.
        Logits of ``output_mask`` rows alone are not offered under CP (generation runs at CP 1).
        """
        cp = self.llm.config.context_parallel_size
        if packed_seq_params is not None:
            sp = self.llm.config.sequence_parallel
            check_packed_input(input_ids, position_ids, packed_seq_params,
                               parallel_state.get_tensor_model_parallel_world_size() if sp else 1,
                               context_parallel=cp)
        if cp > 1 and output_mask is not None and labels is None:
            raise NotImplementedError("logits of output_mask rows under context parallelism: "
                                      "generate at context_parallel=1")
        bounds = _cp_bounds(input_ids.shape[1], packed_seq_params)
        local = _cp_index(bounds, cp, input_ids.device)  # this CP rank's tokens, or None
        llm_inputs = dict(attention_mask=attention_mask, labels=_take(labels, local, 1),
                          packed_seq_params=packed_seq_params)
        if output_mask is not None:
            llm_inputs.update(loss_mask=_take(output_mask, local, 1), output_processor=(
                masked_token_loss if labels is not None else selected_logits))
        ids, positions = _take(input_ids, local, 1), _take(position_ids, local, 1)
        if not self.pre_process:
            output = self.llm(ids, positions, **llm_inputs)
        else:
            embeds = _take(self._embed(images, input_ids, position_ids, image_features),
                           local, 0)  # [S/cp, B, H]
            if self.llm.config.sequence_parallel:
                embeds = tensor_parallel.scatter_to_sequence_parallel_region(embeds)
            output = self.llm(ids, positions, decoder_input=embeds, **llm_inputs)
        if local is None or not self.post_process:
            return output
        # [B, S / cp, ...] -> [B, S, ...]: the caller reduces the whole output alike on every
        # CP rank, so each rank's gradient is already the whole one (keep this rank's rows)
        whole = gather_from_cp(output.transpose(0, 1), bounds,
                               parallel_state.get_context_parallel_group(), reduce_grad=False)
        return whole.transpose(0, 1)

    def _embed(self, images: PackedImages | None, input_ids: torch.Tensor,
               position_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """The LM's input embeddings ``[S, B, H]`` of the whole sequence, image placeholders
        filled with ``image_features`` (computed here from ``images`` when not given; whole on
        every TP rank)."""
        if images is not None and image_features is not None:
            raise ValueError("give images or their image_features, not both")
        embeds = self.llm.embedding(input_ids=input_ids, position_ids=position_ids)  # [S, B, H]
        placeholders = input_ids == self.vl_config.image_token_id  # [B, S]
        if images is not None:
            image_features = self.image_features(images)
        if image_features is not None:
            features = image_features.to(embeds.dtype)
            if int(placeholders.sum()) != features.shape[0]:
                raise ValueError(f"{int(placeholders.sum())} image tokens in input_ids but the "
                                 f"images give {features.shape[0]} features (one per 2x2 window)")
            # Placeholders are filled batch-major (as in HF), so go through [B, S, H].
            embeds = embeds.transpose(0, 1).clone()
            embeds[placeholders] = features
            embeds = embeds.transpose(0, 1).contiguous()
        elif placeholders.any():
            raise ValueError("input_ids contain image tokens but no image was given")
        untouched = self._modules_without_gradient(images)
        if untouched and torch.is_grad_enabled():
            embeds = embeds + _zero_touch(untouched).to(embeds.dtype)
        return embeds

    def _modules_without_gradient(self, images: PackedImages | None) -> list[torch.nn.Module]:
        """The first stage's modules this forward would give no gradient: the encoder and the
        projector for a pack of text-only samples, the encoder when it runs frozen."""
        if images is None:
            return [self.encoder, self.projector]
        return [] if self.encoder_trainable else [self.encoder]


def _zero_touch(modules: list[torch.nn.Module]) -> torch.Tensor:
    """A scalar 0 that depends on every parameter of ``modules``, so that each gets a (zero)
    gradient in every micro-batch. Megatron's DDP with ``overlap_grad_reduce`` launches a bucket's
    reduction once all its parameters reported a gradient as many times as in the first step;
    a micro-batch in which the encoder had no gradient (a pack of text-only samples, a frozen
    encoder under ``no_grad``) would leave its buckets unlaunched and fail the step. The cost is
    one read of those parameters and a zero gradient into their buffers per micro-batch."""
    return sum(p.sum() for m in modules for p in m.parameters()) * 0.0


def _cp_bounds(seq_length: int, packed_seq_params: PackedSeqParams | None) -> list[int]:
    """The global segment boundaries the CP split follows: the pack's (padded) ``cu_seqlens``,
    or one segment per row unpacked (megatron's per-sequence zigzag)."""
    if packed_seq_params is None:
        return [0, seq_length]
    padded = packed_seq_params.cu_seqlens_q_padded
    return (packed_seq_params.cu_seqlens_q if padded is None else padded).tolist()


def _cp_index(bounds: list[int], cp: int, device) -> torch.Tensor | None:
    """int64 ``[S / cp]``: the sequence positions this CP rank holds; None without CP."""
    if cp == 1:
        return None
    return cp_partition_index(bounds, cp, parallel_state.get_context_parallel_rank(), device)


def _take(tensor: torch.Tensor | None, index: torch.Tensor | None, dim: int):
    """``tensor``'s rows ``index`` along ``dim`` (differentiable); unchanged without CP."""
    if tensor is None or index is None:
        return tensor
    return tensor.index_select(dim, index)
