"""FineViT-VL: a FineViT encoder, a 2×2 merge projector and a Qwen3 language model.

``FineViTVLConfig`` pairs the two tower configs with the image placeholder token id; ``to_dict``
/ ``from_dict`` nest the towers' own dicts (``{"vit": {...}, "llm": {...}, "image_token_id": n}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_finevit.config.llm import Qwen3Config
from megatron_finevit.config.vit import FineViTConfig


@dataclass
class FineViTVLConfig:
    vit: FineViTConfig = field(default_factory=FineViTConfig)
    llm: Qwen3Config = field(default_factory=Qwen3Config)
    image_token_id: int = 151655  # Qwen2-VL's <|image_pad|>

    def to_dict(self) -> dict:
        return {"vit": self.vit.to_dict(), "llm": self.llm.to_dict(),
                "image_token_id": self.image_token_id}

    @classmethod
    def from_dict(cls, values: dict) -> "FineViTVLConfig":
        unknown = sorted(set(values) - {"vit", "llm", "image_token_id"})
        if unknown:
            raise ValueError(f"unknown FineViTVLConfig fields {unknown}")
        return cls(vit=FineViTConfig.from_dict(values["vit"]),
                   llm=Qwen3Config.from_dict(values["llm"]),
                   image_token_id=values.get("image_token_id", cls.image_token_id))

    @property
    def num_layers(self) -> int:
        """The deeper stack's depth (mappings carry their own layer count)."""
        return max(self.vit.num_layers, self.llm.num_layers)

    def validate(self, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> None:
        """Both towers must split at the layout; this version builds the VL model at TP=PP=1."""
        if tensor_parallel != 1 or pipeline_parallel != 1:
            raise ValueError("FineViT-VL is supported at tensor_parallel=1, pipeline_parallel=1 "
                             f"only (got TP={tensor_parallel}, PP={pipeline_parallel})")
        self.vit.validate()
        self.llm.validate()
        if not 0 <= self.image_token_id < self.llm.vocab_size:
            raise ValueError(f"image_token_id={self.image_token_id} outside the vocabulary of "
                             f"{self.llm.vocab_size}")
