"""Qwen3 on megatron-core: one factory around megatron's ``GPTModel``.

The layers come from ``models/specs.py`` with causal masking and q/k RMSNorm, on the backend
``Qwen3Config.spec_backend`` names: ``local`` (torch norms + our packed / context-parallel core
attention) or ``te`` — megatron's ``get_gpt_layer_with_transformer_engine_spec`` layout:
``TELayerNormColumnParallelLinear`` (input RMSNorm fused into QKV, and pre-MLP RMSNorm into fc1),
``TEDotProductAttention`` (THD, CP), ``TENorm`` q/k norms, ``TERowParallelLinear`` projections;
FP8 (``fp8``, ``fp8_recipe``) only there. Both save the same checkpoint keys. ``GPTModel``
provides the vocab-parallel embedding, RoPE (θ from the config, applied per packed segment for
THD input), the final norm and the vocab-parallel output layer, tied to the embedding when the
config says so (megatron keeps the two copies in sync across pipeline stages).

Inputs (megatron's convention): ``input_ids`` [b, s], ``position_ids`` [b, s]; packed sequences
go in as b = 1 with ``packed_seq_params`` (THD cu_seqlens). Output: logits [b, s, V_pad / TP]
(vocab-parallel) or, with ``labels``, the per-token loss [b, s].
"""

from __future__ import annotations


from megatron_finevit.config.llm import Qwen3Config


def build_qwen3(config: Qwen3Config, transformer_config,
                pre_process: bool | None = None, post_process: bool | None = None,
                vp_stage: int | None = None, parallel_output: bool = True,
                scatter_embedding_sequence_parallel: bool = True):
    """This pipeline stage's Qwen3 ``GPTModel``.

    ``transformer_config`` comes from ``config.to_transformer_config(...)`` (so TP/PP/CP/SP and
    dtype are decided once, there). ``pre_process`` / ``post_process`` default to whether this
    rank is the first / last pipeline stage. ``scatter_embedding_sequence_parallel=False`` keeps
    the embedding output whole under sequence parallelism, for callers that edit it before the
    decoder (FineViT-VL inserts image features) and scatter it themselves.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_finevit.models.specs import transformer_block_spec

    _check_matches(config, transformer_config)
    # Before anything is allocated: a te config without TransformerEngine fails here too.
    spec = transformer_block_spec(transformer_config, config.spec_backend, AttnMaskType.causal,
                                  qk_layernorm=True, final_norm=True, vp_stage=vp_stage)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return GPTModel(
        transformer_config,
        spec,
        vocab_size=config.padded_vocab_size,
        max_sequence_length=config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=config.tie_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=config.rope_theta,
        scatter_embedding_sequence_parallel=scatter_embedding_sequence_parallel,
        vp_stage=vp_stage,
    )


def _check_matches(config: Qwen3Config, transformer_config) -> None:
    """The megatron config must describe the same network as the Qwen3 config."""
    pairs = {
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "ffn_hidden_size": config.ffn_hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_query_groups": config.num_query_groups,
        "kv_channels": config.head_dim,
        "fp8": config.fp8,
    }
    wrong = {k: (getattr(transformer_config, k), v) for k, v in pairs.items()
             if getattr(transformer_config, k) != v}
    if wrong:
        raise ValueError("TransformerConfig does not match the Qwen3 config "
                         + ", ".join(f"{k}: {a} != {b}" for k, (a, b) in wrong.items()))
    if not (transformer_config.qk_layernorm and transformer_config.gated_linear_unit):
        raise ValueError("Qwen3 needs qk_layernorm=True and gated_linear_unit=True; build the "
                         "TransformerConfig with Qwen3Config.to_transformer_config()")
