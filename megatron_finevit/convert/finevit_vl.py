"""FineViT-VL: our megatron ``FineViTVLModel`` (models/vlm.py) <-> the transformers export
``megatron_finevit.hf.FineViTVLForConditionalGeneration`` (``model_type`` "finevit_vl").

Key prefixes: megatron ``encoder.`` / ``projector.`` / ``llm.`` <-> HF ``visual.`` /
``projector.`` / ``language_model.``. The encoder and language-model mappings are FineViT's and
Qwen3's with those prefixes; each carries its own stack depth (``ParamMapping.num_layers``).
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_finevit.config.vlm import QWEN_IMAGE_PAD_ID, FineViTVLConfig
from megatron_finevit.convert.finevit import vit_config_from_hf, vit_hf_config, vit_mappings
from megatron_finevit.convert.qwen3 import CONVERTER as QWEN3
from megatron_finevit.convert.registry import (
    AutoMapping,
    ConversionError,
    ParamMapping,
    column_parallel,
    replicated,
    row_parallel,
)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _placed(mappings: list[ParamMapping], megatron_prefix: str, hf_prefix: str,
            num_layers: int) -> list[ParamMapping]:
    """``mappings`` moved under the prefixes, with their stack depth fixed to ``num_layers``."""
    return [dataclasses.replace(m, megatron=megatron_prefix + m.megatron,
                                hf=tuple(hf_prefix + n for n in m.hf), num_layers=num_layers)
            for m in mappings]


def projector_mappings(c: FineViTVLConfig) -> list[ParamMapping]:
    """RMSNorm ``[h]``, fc1 ``[4h, 4h]`` (column-parallel), fc2 ``[H, 4h]`` (row-parallel)."""
    h = c.vit.hidden_size
    merged = h * c.vit.merge_size ** 2
    out = c.llm.hidden_size
    return [
        replicated("projector.norm.weight", "projector.norm.weight", (h,)),
        column_parallel("projector.fc1.weight", "projector.fc1.weight", (merged, merged)),
        column_parallel("projector.fc1.bias", "projector.fc1.bias", (merged,)),
        row_parallel("projector.fc2.weight", "projector.fc2.weight", (out, merged)),
        AutoMapping("projector.fc2.bias", ("projector.fc2.bias",), ((out,),), tp_dim=None),
    ]


class FineViTVLConverter:
    name = "finevit-vl"
    config_class = FineViTVLConfig
    megatron_roots = ("encoder", "projector", "llm")

    def config_from_hf(self, hf: dict) -> FineViTVLConfig:
        if hf.get("model_type") != "finevit_vl":
            raise ConversionError(f"config.json has model_type={hf.get('model_type')!r}, "
                                  "expected 'finevit_vl'")
        for key in ("vision_config", "text_config"):
            if not isinstance(hf.get(key), dict):
                raise ConversionError(f"config.json lacks {key!r}")
        return FineViTVLConfig(vit=vit_config_from_hf(hf["vision_config"]),
                               llm=QWEN3.config_from_hf(hf["text_config"]),
                               image_token_id=hf.get("image_token_id", QWEN_IMAGE_PAD_ID))

    def hf_config(self, config: FineViTVLConfig, dtype: torch.dtype) -> dict:
        text = {k: v for k, v in QWEN3.hf_config(config.llm, dtype).items()
                if k not in ("architectures", "torch_dtype")}
        return {
            "architectures": ["FineViTVLForConditionalGeneration"],
            "model_type": "finevit_vl",
            "vision_config": vit_hf_config(config.vit),
            "text_config": text,
            "image_token_id": config.image_token_id,
            "tie_word_embeddings": config.llm.tie_embeddings,
            "dtype": _DTYPE_NAMES[dtype],
        }

    def mappings(self, c: FineViTVLConfig) -> list[ParamMapping]:
        encoder = [dataclasses.replace(m, num_layers=c.vit.num_layers)
                   for m in vit_mappings(c.vit, "encoder.", "visual.")]
        llm = _placed(QWEN3.mappings(c.llm), "llm.", "language_model.", c.llm.num_layers)
        return encoder + projector_mappings(c) + llm

    def ignored_hf_keys(self, c: FineViTVLConfig) -> set[str]:
        return {"language_model." + k for k in QWEN3.ignored_hf_keys(c.llm)}

    def transformer_config(self, config: FineViTVLConfig,
                           params_dtype: torch.dtype = torch.float32, **overrides):
        """``(encoder TransformerConfig, language-model TransformerConfig)`` at TP = PP = 1."""
        return config.to_transformer_configs(params_dtype=params_dtype, **overrides)

    def build_model(self, config: FineViTVLConfig, transformer_config):
        from megatron_finevit.models.vlm import FineViTVLModel

        vit_tc, llm_tc = transformer_config
        return FineViTVLModel(config, vit_tc, llm_tc)

    def save_processor(self, config: FineViTVLConfig, out_dir) -> list[str]:
        """The export's transformers processor (``hf/processing_finevit_vl.py``): the bundled Qwen
        tokenizer and the Stage III image policy; none for a model off Qwen's vocabulary."""
        from megatron_finevit.hf.processing_finevit_vl import save_finevit_vl_processor

        return save_finevit_vl_processor(out_dir, config.image_token_id, config.llm.vocab_size)


CONVERTER = FineViTVLConverter()
