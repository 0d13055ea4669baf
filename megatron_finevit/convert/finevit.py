"""FineViT: our megatron ``FineViTModel`` (models/vit) <-> the transformers export
``megatron_finevit.hf.FineViTHFModel`` (``model_type`` "finevit").

HF names: ``patch_embed.weight``, ``layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj}.weight``, ``norm.weight``. On the megatron
side the norms carry TE's names (``linear_qkv.layer_norm_weight`` …, models/specs.py), q/k/v fuse
into ``linear_qkv`` head by head (one head per query group) and gate/up into ``linear_fc1``.
Stage I's MIM mask token (key ``mask_token``) is not part of the encoder export and is skipped.

``vit_mappings`` takes key prefixes so a composite model (FineViT-VL: HF ``visual.``) can reuse it.
"""

from __future__ import annotations

import torch

from megatron_finevit.config.vit import FineViTConfig
from megatron_finevit.convert.registry import (
    ConversionError,
    GatedMLPMapping,
    ParamMapping,
    QKVMapping,
    replicated,
    row_parallel,
)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def vit_config_from_hf(hf: dict) -> FineViTConfig:
    """``FineViTHFConfig`` fields (a dict) -> ``FineViTConfig``."""
    if hf.get("model_type") != "finevit":
        raise ConversionError(f"vision config has model_type={hf.get('model_type')!r}, "
                              "expected 'finevit'")
    defaults = FineViTConfig()
    try:
        return FineViTConfig(
            num_layers=hf["num_hidden_layers"],
            hidden_size=hf["hidden_size"],
            ffn_hidden_size=hf["intermediate_size"],
            num_attention_heads=hf["num_attention_heads"],
            patch_size=hf.get("patch_size", defaults.patch_size),
            in_channels=hf.get("in_channels", defaults.in_channels),
            merge_size=hf.get("merge_size", defaults.merge_size),
            rope_theta=float(hf.get("rope_theta", defaults.rope_theta)),
            norm_eps=hf.get("rms_norm_eps", defaults.norm_eps),
            init_std=hf.get("initializer_range", defaults.init_std),
        )
    except KeyError as exc:
        raise ConversionError(f"config lacks required field {exc.args[0]!r}") from exc


def vit_hf_config(c: FineViTConfig) -> dict:
    """``FineViTHFConfig`` fields for ``c`` (no architectures / dtype)."""
    if c.add_bias_linear:
        raise ConversionError("the HF FineViT export has bias-free linears; add_bias_linear=True "
                              "is not supported")
    return {
        "model_type": "finevit",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.ffn_hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_attention_heads,
        "patch_size": c.patch_size,
        "in_channels": c.in_channels,
        "merge_size": c.merge_size,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.norm_eps,
        "initializer_range": c.init_std,
    }


def vit_mappings(c: FineViTConfig, megatron_prefix: str = "", hf_prefix: str = ""
                 ) -> list[ParamMapping]:
    """The encoder's mappings; prefixes place it inside a bigger model (FineViT-VL)."""
    h, f, d, heads = c.hidden_size, c.ffn_hidden_size, c.head_dim, c.num_attention_heads
    attn = megatron_prefix + "decoder.layers.*.self_attention."
    mlp = megatron_prefix + "decoder.layers.*.mlp."
    hf = hf_prefix + "layers.*."
    return [
        replicated(megatron_prefix + "patch_embed.proj.weight", hf_prefix + "patch_embed.weight",
                   (h, c.patch_dim)),
        replicated(attn + "linear_qkv.layer_norm_weight", hf + "input_layernorm.weight", (h,)),
        QKVMapping(attn + "linear_qkv.weight",
                   tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"), ((h, h),) * 3,
                   num_heads=heads, num_groups=heads, head_dim=d),
        row_parallel(attn + "linear_proj.weight", hf + "self_attn.o_proj.weight", (h, h)),
        replicated(mlp + "linear_fc1.layer_norm_weight", hf + "post_attention_layernorm.weight",
                   (h,)),
        GatedMLPMapping(mlp + "linear_fc1.weight",
                        (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), ((f, h),) * 2),
        row_parallel(mlp + "linear_fc2.weight", hf + "mlp.down_proj.weight", (h, f)),
        replicated(megatron_prefix + "decoder.final_layernorm.weight", hf_prefix + "norm.weight",
                   (h,)),
    ]


class FineViTConverter:
    name = "finevit"
    config_class = FineViTConfig
    # Checkpoint keys under these top-level modules are encoder tensors (not ``mask_token``).
    megatron_roots = ("patch_embed", "decoder")

    def config_from_hf(self, hf: dict) -> FineViTConfig:
        return vit_config_from_hf(hf)

    def hf_config(self, config: FineViTConfig, dtype: torch.dtype) -> dict:
        return {"architectures": ["FineViTHFModel"], **vit_hf_config(config),
                "dtype": _DTYPE_NAMES[dtype]}

    def mappings(self, config: FineViTConfig) -> list[ParamMapping]:
        return vit_mappings(config)

    def ignored_hf_keys(self, config: FineViTConfig) -> set[str]:
        return set()

    def transformer_config(self, config: FineViTConfig, params_dtype: torch.dtype = torch.float32,
                           **overrides):
        return config.to_transformer_config(params_dtype=params_dtype, **overrides)

    def build_model(self, config: FineViTConfig, transformer_config):
        from megatron_finevit.models.vit import FineViTModel

        return FineViTModel(config, transformer_config)


CONVERTER = FineViTConverter()
