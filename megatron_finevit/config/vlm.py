"""FineViT-VL: a FineViT encoder, a 2×2 merge projector and a Qwen3 language model.

``FineViTVLConfig`` pairs the two tower configs with the image placeholder token id; ``to_dict``
/ ``from_dict`` nest the towers' own dicts (``{"vit": {...}, "llm": {...}, "image_token_id": n}``).

Parallel layout (as megatron's LLaVA): tensor and sequence parallelism apply to both towers; the
language model is split into pipeline stages while the encoder and projector live whole on the
first stage (the encoder is ~1/10 of the LM's FLOPs at the paper's sizes, and its output feeds the
LM's first layer), so the encoder's ``TransformerConfig`` is built with one pipeline stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_finevit.config.llm import Qwen3Config, qwen3_1p7b, qwen3_8b, tiny_qwen3
from megatron_finevit.config.vit import FineViTConfig, finevit_0p86b, tiny_vit

QWEN_IMAGE_PAD_ID = 151655  # <|image_pad|> in the Qwen2-VL / Qwen3 tokenizer


@dataclass
class FineViTVLConfig:
    vit: FineViTConfig
    llm: Qwen3Config
    image_token_id: int = QWEN_IMAGE_PAD_ID

    def to_dict(self) -> dict:
        return {"vit": self.vit.to_dict(), "llm": self.llm.to_dict(),
                "image_token_id": self.image_token_id}

    @classmethod
    def from_dict(cls, values: dict) -> "FineViTVLConfig":
        unknown = sorted(set(values) - {"vit", "llm", "image_token_id"})
        if unknown:
            raise ValueError(f"unknown FineViTVLConfig fields {unknown}")
        missing = sorted({"vit", "llm"} - set(values))
        if missing:
            raise ValueError(f"FineViTVLConfig needs {missing}")
        return cls(vit=FineViTConfig.from_dict(values["vit"]),
                   llm=Qwen3Config.from_dict(values["llm"]),
                   image_token_id=values.get("image_token_id", QWEN_IMAGE_PAD_ID))

    @property
    def num_layers(self) -> int:
        """The deeper stack's depth (mappings carry their own layer count)."""
        return max(self.vit.num_layers, self.llm.num_layers)

    def validate(self, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> None:
        """Both towers must split over ``tensor_parallel`` ranks and the language model over
        ``pipeline_parallel`` stages (the encoder is not pipelined)."""
        problems = []
        for name, tower, pp in (("encoder", self.vit, 1), ("language model", self.llm,
                                                           pipeline_parallel)):
            try:
                tower.validate(tensor_parallel, pp)
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
        if self.vit.merge_size != 2:
            problems.append(f"merge_size={self.vit.merge_size}: the projector merges 2x2 windows")
        if not 0 <= self.image_token_id < self.llm.vocab_size:
            problems.append(f"image_token_id={self.image_token_id} outside the vocabulary of "
                            f"{self.llm.vocab_size}")
        if problems:
            raise ValueError("invalid FineViT-VL config: " + "; ".join(problems))

    def to_transformer_configs(self, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                               sequence_parallel: bool = False,
                               params_dtype: torch.dtype = torch.float32, **overrides):
        """``(encoder TransformerConfig, language-model TransformerConfig)`` at this layout; the
        encoder's has one pipeline stage (see the module docstring)."""
        self.validate(tensor_parallel, pipeline_parallel)
        vit = self.vit.to_transformer_config(tensor_parallel, 1, 1, sequence_parallel,
                                             params_dtype, **overrides)
        llm = self.llm.to_transformer_config(tensor_parallel, pipeline_parallel, 1,
                                             sequence_parallel, params_dtype, **overrides)
        return vit, llm


# --- presets: the paper's encoder with the ablation LLMs (App. B.2), and a tiny one ---------------


def finevit_vl_1p7b() -> FineViTVLConfig:
    return FineViTVLConfig(vit=finevit_0p86b(), llm=qwen3_1p7b())


def finevit_vl_8b() -> FineViTVLConfig:
    return FineViTVLConfig(vit=finevit_0p86b(), llm=qwen3_8b())


def tiny_finevit_vl() -> FineViTVLConfig:
    """CPU tests: ``tiny_vit`` (2 layers) + ``tiny_qwen3`` (the real tokenizer's ids)."""
    return FineViTVLConfig(vit=tiny_vit(num_layers=2), llm=tiny_qwen3())


VL_PRESETS = {"finevit_vl_1p7b": finevit_vl_1p7b, "finevit_vl_8b": finevit_vl_8b,
              "tiny_finevit_vl": tiny_finevit_vl}


def vl_preset(name: str) -> FineViTVLConfig:
    if name not in VL_PRESETS:
        raise ValueError(f"unknown FineViT-VL preset {name!r}; choose one of {sorted(VL_PRESETS)}")
    return VL_PRESETS[name]()
