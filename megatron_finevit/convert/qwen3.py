"""Qwen3: HF ``Qwen3ForCausalLM`` <-> our megatron ``GPTModel`` (models/llm/qwen3.py).

HF on-disk names (``save_pretrained`` of transformers 5.x; the same as the in-memory names for
Qwen3) are ``model.embed_tokens``, ``model.layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj,
self_attn.{q,k}_norm, post_attention_layernorm, mlp.{gate,up,down}_proj}``, ``model.norm`` and —
untied models only — ``lm_head``.
"""

from __future__ import annotations

import torch

from megatron_finevit.config.llm import Qwen3Config
from megatron_finevit.convert.registry import (
    ConversionError,
    GatedMLPMapping,
    ParamMapping,
    QKVMapping,
    VocabMapping,
    replicated,
    row_parallel,
)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class Qwen3Converter:
    name = "qwen3"
    config_class = Qwen3Config
    # Top-level modules of the megatron model: checkpoint keys under them are model tensors.
    megatron_roots = ("embedding", "decoder", "output_layer")

    def config_from_hf(self, hf: dict) -> Qwen3Config:
        """Translate an HF ``config.json`` (transformers 4.x ``rope_theta`` or 5.x
        ``rope_parameters``); refuse features our model does not implement."""
        if hf.get("model_type") != "qwen3":
            raise ConversionError(f"config.json has model_type={hf.get('model_type')!r}, "
                                  "expected 'qwen3'")
        unsupported = []
        if hf.get("attention_bias"):
            unsupported.append("attention_bias=true")
        if hf.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act={hf['hidden_act']!r}")
        if hf.get("use_sliding_window"):
            unsupported.append("use_sliding_window=true")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            unsupported.append(f"rope type {rope.get('rope_type', rope.get('type'))!r}")
        if unsupported:
            raise ConversionError("unsupported Qwen3 config: " + ", ".join(unsupported))
        rope_theta = hf.get("rope_theta", rope.get("rope_theta"))
        if rope_theta is None:
            raise ConversionError("config.json has neither rope_theta nor rope_parameters.rope_theta")
        try:
            heads = hf["num_attention_heads"]
            return Qwen3Config(
                num_layers=hf["num_hidden_layers"],
                hidden_size=hf["hidden_size"],
                ffn_hidden_size=hf["intermediate_size"],
                num_attention_heads=heads,
                num_query_groups=hf.get("num_key_value_heads", heads),
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                vocab_size=hf["vocab_size"],
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                rope_theta=float(rope_theta),
                norm_eps=hf.get("rms_norm_eps", 1e-6),
                max_position_embeddings=hf.get("max_position_embeddings", 40960),
                init_std=hf.get("initializer_range", 0.02),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
            )
        except KeyError as exc:
            raise ConversionError(f"config.json lacks required field {exc.args[0]!r}") from exc

    def hf_config(self, config: Qwen3Config, dtype: torch.dtype) -> dict:
        """``config.json`` in the layout of the public Qwen3 checkpoints."""
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "head_dim": config.head_dim,
            "hidden_act": "silu",
            "hidden_size": config.hidden_size,
            "initializer_range": config.init_std,
            "intermediate_size": config.ffn_hidden_size,
            "max_position_embeddings": config.max_position_embeddings,
            "num_attention_heads": config.num_attention_heads,
            "num_hidden_layers": config.num_layers,
            "num_key_value_heads": config.num_query_groups,
            "rms_norm_eps": config.norm_eps,
            "rope_scaling": None,
            "rope_theta": config.rope_theta,
            "tie_word_embeddings": config.tie_embeddings,
            "torch_dtype": _DTYPE_NAMES[dtype],
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": config.vocab_size,
        }

    def mappings(self, c: Qwen3Config) -> list[ParamMapping]:
        h, d, f = c.hidden_size, c.head_dim, c.ffn_hidden_size
        attn = "decoder.layers.*.self_attention."
        mlp = "decoder.layers.*.mlp."
        hf = "model.layers.*."
        result = [
            VocabMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                         ((c.vocab_size, h),), padded_rows=c.padded_vocab_size),
            replicated(attn + "linear_qkv.layer_norm_weight", hf + "input_layernorm.weight", (h,)),
            QKVMapping(attn + "linear_qkv.weight",
                       tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"),
                       ((c.num_attention_heads * d, h), (c.num_query_groups * d, h),
                        (c.num_query_groups * d, h)),
                       num_heads=c.num_attention_heads, num_groups=c.num_query_groups, head_dim=d),
            row_parallel(attn + "linear_proj.weight", hf + "self_attn.o_proj.weight",
                         (h, c.num_attention_heads * d)),
            replicated(attn + "q_layernorm.weight", hf + "self_attn.q_norm.weight", (d,)),
            replicated(attn + "k_layernorm.weight", hf + "self_attn.k_norm.weight", (d,)),
            replicated(mlp + "linear_fc1.layer_norm_weight", hf + "post_attention_layernorm.weight",
                       (h,)),
            GatedMLPMapping(mlp + "linear_fc1.weight",
                            (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                            ((f, h), (f, h))),
            row_parallel(mlp + "linear_fc2.weight", hf + "mlp.down_proj.weight", (h, f)),
            replicated("decoder.final_layernorm.weight", "model.norm.weight", (h,)),
        ]
        if not c.tie_embeddings:
            result.append(VocabMapping("output_layer.weight", ("lm_head.weight",),
                                       ((c.vocab_size, h),), padded_rows=c.padded_vocab_size))
        return result

    def ignored_hf_keys(self, config: Qwen3Config) -> set[str]:
        # Some tied checkpoints store lm_head anyway; it is the embedding, so it is not read.
        return {"lm_head.weight"} if config.tie_embeddings else set()

    def transformer_config(self, config: Qwen3Config, params_dtype: torch.dtype = torch.float32,
                           **overrides):
        return config.to_transformer_config(params_dtype=params_dtype, **overrides)

    def build_model(self, config: Qwen3Config, transformer_config):
        from megatron_finevit.models.llm import build_qwen3

        return build_qwen3(config, transformer_config)


CONVERTER = Qwen3Converter()
