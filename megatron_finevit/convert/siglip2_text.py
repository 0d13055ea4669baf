"""SigLIP2 text tower: HF ``Siglip2TextModel`` (or the text half of a SigLIP checkpoint) <->
our megatron ``SigLIPTextTower`` (models/text_tower.py).

Accepted HF directories (``config.json`` ``model_type``):

* ``siglip2_text_model`` / ``siglip_text_model`` — a text model saved on its own; tensors
  ``embeddings.*``, ``encoder.layers.N.*``, ``final_layer_norm.*``, ``head.*``.
* ``siglip`` / ``siglip2`` — a full two-tower checkpoint such as
  ``google/siglip2-giant-opt-patch16-256`` (the fixed-resolution SigLIP2 checkpoints are published
  as ``SiglipModel``): the same tensors under ``text_model.``; the image tower and
  ``logit_scale`` / ``logit_bias`` are skipped by exact name (listed by building the checkpoint's
  transformers model on the meta device, so any other stray tensor is still reported).

Export always writes a standalone ``Siglip2TextModel`` directory.

Per layer, HF ``layer_norm1`` / ``layer_norm2`` are megatron's (TE-named)
``linear_qkv.layer_norm_*`` / ``linear_fc1.layer_norm_*``; ``q/k/v_proj`` (weights and biases) fuse into ``linear_qkv``
(one head per group: plain multi-head attention); ``out_proj`` is ``linear_proj``; ``fc1`` /
``fc2`` are ``linear_fc1`` / ``linear_fc2``. Row-parallel biases are replicated.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from megatron_finevit.config.text import SigLIP2TextConfig
from megatron_finevit.convert.registry import (
    ConversionError,
    ParamMapping,
    QKVMapping,
    VocabMapping,
    column_parallel,
    replicated,
    row_parallel,
)

TEXT_MODEL_TYPES = ("siglip2_text_model", "siglip_text_model")
TWO_TOWER_MODEL_TYPES = ("siglip2", "siglip")
TWO_TOWER_TEXT_PREFIX = "text_model."
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class HFSourceTextConfig(SigLIP2TextConfig):
    """A text config read from an HF directory, plus where its tensors sit in that directory.
    ``to_dict`` drops the source fields: the megatron checkpoint describes the tower only."""

    hf_prefix: str = ""
    hf_skipped: frozenset[str] = frozenset()

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(SigLIP2TextConfig)}


def _resolved_hf_config(hf: dict):
    """transformers' config object for ``hf`` (so omitted fields take transformers' defaults,
    as they do when the checkpoint is loaded there)."""
    from transformers import AutoConfig

    model_type = hf.get("model_type")
    if model_type not in TEXT_MODEL_TYPES + TWO_TOWER_MODEL_TYPES:
        raise ConversionError(f"config.json has model_type={model_type!r}; expected one of "
                              f"{TEXT_MODEL_TYPES + TWO_TOWER_MODEL_TYPES}")
    return AutoConfig.for_model(**hf)


def _other_tower_tensors(resolved) -> frozenset[str]:
    """Names of a two-tower checkpoint's tensors outside the text tower (meta-device build)."""
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(resolved)
    return frozenset(n for n in model.state_dict() if not n.startswith(TWO_TOWER_TEXT_PREFIX))


class SigLIP2TextConverter:
    name = "siglip2-text"
    config_class = SigLIP2TextConfig
    # Top-level modules of the megatron tower: checkpoint keys under them are model tensors.
    megatron_roots = ("embedding", "decoder", "head")

    def config_from_hf(self, hf: dict) -> HFSourceTextConfig:
        resolved = _resolved_hf_config(hf)
        two_tower = hf["model_type"] in TWO_TOWER_MODEL_TYPES
        text = resolved.text_config if two_tower else resolved
        if text.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConversionError(f"unsupported SigLIP text config: hidden_act={text.hidden_act!r}"
                                  f" (supported: {SUPPORTED_ACTIVATIONS})")
        return HFSourceTextConfig(
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            ffn_hidden_size=text.intermediate_size,
            num_attention_heads=text.num_attention_heads,
            projection_size=text.projection_size or text.hidden_size,
            vocab_size=text.vocab_size,
            max_position_embeddings=text.max_position_embeddings,
            norm_eps=text.layer_norm_eps,
            pad_token_id=text.pad_token_id,
            bos_token_id=text.bos_token_id,
            eos_token_id=text.eos_token_id,
            hf_prefix=TWO_TOWER_TEXT_PREFIX if two_tower else "",
            hf_skipped=_other_tower_tensors(resolved) if two_tower else frozenset(),
        )

    def hf_config(self, config: SigLIP2TextConfig, dtype: torch.dtype) -> dict:
        """``config.json`` of a standalone transformers ``Siglip2TextModel``."""
        return {
            "architectures": ["Siglip2TextModel"],
            "model_type": "siglip2_text_model",
            "attention_dropout": 0.0,
            "bos_token_id": config.bos_token_id,
            "dtype": _DTYPE_NAMES[dtype],
            "eos_token_id": config.eos_token_id,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": config.hidden_size,
            "intermediate_size": config.ffn_hidden_size,
            "layer_norm_eps": config.norm_eps,
            "max_position_embeddings": config.max_position_embeddings,
            "num_attention_heads": config.num_attention_heads,
            "num_hidden_layers": config.num_layers,
            "pad_token_id": config.pad_token_id,
            "projection_size": config.projection_size,
            "vocab_size": config.vocab_size,
        }

    def mappings(self, c: SigLIP2TextConfig) -> list[ParamMapping]:
        h, f, d, heads = c.hidden_size, c.ffn_hidden_size, c.head_dim, c.num_attention_heads
        prefix = getattr(c, "hf_prefix", "")
        hf = prefix + "encoder.layers.*."
        attn = "decoder.layers.*.self_attention."
        mlp = "decoder.layers.*.mlp."

        def qkv(kind: str, shape_tail: tuple[int, ...]) -> QKVMapping:
            return QKVMapping(attn + f"linear_qkv.{kind}",
                              tuple(hf + f"self_attn.{p}_proj.{kind}" for p in "qkv"),
                              ((heads * d, *shape_tail),) * 3,
                              num_heads=heads, num_groups=heads, head_dim=d)

        result = [
            VocabMapping("embedding.word_embeddings.weight",
                         (prefix + "embeddings.token_embedding.weight",),
                         ((c.vocab_size, h),), padded_rows=c.padded_vocab_size),
            replicated("embedding.position_embeddings.weight",
                       prefix + "embeddings.position_embedding.weight",
                       (c.max_position_embeddings, h)),
            qkv("weight", (h,)),
            qkv("bias", ()),
            row_parallel(attn + "linear_proj.weight", hf + "self_attn.out_proj.weight",
                         (h, heads * d)),
            replicated(attn + "linear_proj.bias", hf + "self_attn.out_proj.bias", (h,)),
            column_parallel(mlp + "linear_fc1.weight", hf + "mlp.fc1.weight", (f, h)),
            column_parallel(mlp + "linear_fc1.bias", hf + "mlp.fc1.bias", (f,)),
            row_parallel(mlp + "linear_fc2.weight", hf + "mlp.fc2.weight", (h, f)),
            replicated(mlp + "linear_fc2.bias", hf + "mlp.fc2.bias", (h,)),
            replicated("head.weight", prefix + "head.weight", (c.projection_size, h)),
            replicated("head.bias", prefix + "head.bias", (c.projection_size,)),
        ]
        norms = (("decoder.final_layernorm.", prefix + "final_layer_norm."),
                 (attn + "linear_qkv.layer_norm_", hf + "layer_norm1."),
                 (mlp + "linear_fc1.layer_norm_", hf + "layer_norm2."))
        for megatron_norm, hf_norm in norms:
            result += [replicated(megatron_norm + p, hf_norm + p, (h,)) for p in ("weight", "bias")]
        return result

    def ignored_hf_keys(self, config: SigLIP2TextConfig) -> set[str]:
        return set(getattr(config, "hf_skipped", ()))

    def transformer_config(self, config: SigLIP2TextConfig,
                           params_dtype: torch.dtype = torch.float32, **overrides):
        return config.to_transformer_config(params_dtype=params_dtype, **overrides)

    def build_model(self, config: SigLIP2TextConfig, transformer_config):
        from megatron_finevit.models.text_tower import build_text_tower

        return build_text_tower(config, transformer_config)


CONVERTER = SigLIP2TextConverter()
