"""FineViT-VL: a FineViT encoder, a 2×2 merge projector and a Qwen3 language model.

``FineViTVLConfig`` pairs the two tower configs with the image placeholder token id; ``to_dict``
/ ``from_dict`` nest the towers' own dicts (``{"vit": {...}, "llm": {...}, "image_token_id": n}``).
Each tower keeps its own layer-spec keys (``vit.spec_backend`` / ``llm.spec_backend``, ``fp8``,
``fp8_recipe``: FP8 only with ``te``), validated by the tower and reported under its name.

Parallel layout: tensor and sequence parallelism apply to both towers (as megatron's LLaVA), and
so does context parallelism (the encoder splits the pack's patches over the CP group, the LM its
tokens: ``models.vlm``); the language model is split into pipeline stages while the encoder
and projector live whole on the first stage (its output feeds the LM's first layer), so the
encoder's ``TransformerConfig`` is built with one pipeline stage. ``first_stage_llm_layers``
gives the first stage fewer LM layers than the others (megatron's uneven split) so that it is not
the bottleneck: the remaining layers split evenly over the other stages.

Virtual pipeline (``virtual_pipeline``, interleaved 1F1B): each pipeline rank holds that many
chunks of the LM, chunk ``v`` of rank ``r`` being the ``v·PP + r``-th of ``PP·VP`` consecutive
pieces (megatron's assignment); the encoder and projector sit with the first chunk of the first
rank. megatron needs every rank's LM layers to split evenly into its chunks: ``num_layers`` a
multiple of ``PP·VP``, or with ``first_stage_llm_layers`` that count and each other rank's share
multiples of ``VP``.
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
    first_stage_llm_layers: int | None = None  # None: the LM's layers split evenly over PP

    def to_dict(self) -> dict:
        return {"vit": self.vit.to_dict(), "llm": self.llm.to_dict(),
                "image_token_id": self.image_token_id,
                "first_stage_llm_layers": self.first_stage_llm_layers}

    @classmethod
    def from_dict(cls, values: dict) -> "FineViTVLConfig":
        unknown = sorted(set(values) - {"vit", "llm", "image_token_id", "first_stage_llm_layers"})
        if unknown:
            raise ValueError(f"unknown FineViTVLConfig fields {unknown}")
        missing = sorted({"vit", "llm"} - set(values))
        if missing:
            raise ValueError(f"FineViTVLConfig needs {missing}")
        return cls(vit=FineViTConfig.from_dict(values["vit"]),
                   llm=Qwen3Config.from_dict(values["llm"]),
                   image_token_id=values.get("image_token_id", QWEN_IMAGE_PAD_ID),
                   first_stage_llm_layers=values.get("first_stage_llm_layers"))

    @property
    def num_layers(self) -> int:
        """The deeper stack's depth (mappings carry their own layer count)."""
        return max(self.vit.num_layers, self.llm.num_layers)

    def validate(self, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                 context_parallel: int = 1, virtual_pipeline: int = 1) -> None:
        """Raise ValueError listing every problem of ``problems``; then a ``te`` tower on a
        machine without TransformerEngine raises ``BackendUnavailable``."""
        from megatron_finevit.config.common import require_spec_backend

        problems = self.problems(tensor_parallel, pipeline_parallel, context_parallel,
                                 virtual_pipeline)
        if problems:
            raise ValueError("invalid FineViT-VL config: " + "; ".join(problems))
        for tower in (self.vit, self.llm):
            require_spec_backend(tower)

    def problems(self, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                 context_parallel: int = 1, virtual_pipeline: int = 1) -> list[str]:
        """One line per problem: both towers must split over ``tensor_parallel`` ranks and the
        language model over ``pipeline_parallel`` stages, each into ``virtual_pipeline`` chunks
        (the encoder is not pipelined)."""
        problems = self._virtual_pipeline_problems(pipeline_parallel, virtual_pipeline)
        uneven = self._uneven(pipeline_parallel)
        if uneven:
            rest, stages = self.llm.num_layers - self.first_stage_llm_layers, pipeline_parallel - 1
            if not 1 <= self.first_stage_llm_layers or rest < stages or rest % stages:
                problems.append(
                    f"first_stage_llm_layers={self.first_stage_llm_layers} must be >= 1 and leave "
                    f"the other {stages} stages an equal share (>= 1 each) of the language "
                    f"model's {self.llm.num_layers} layers")
        llm_pp = 1 if uneven else pipeline_parallel
        for name, tower, pp in (("encoder", self.vit, 1), ("language model", self.llm, llm_pp)):
            problems += [f"{name}: {problem}"
                         for problem in tower.problems(tensor_parallel, pp, context_parallel)]
        if self.vit.merge_size != 2:
            problems.append(f"merge_size={self.vit.merge_size}: the projector merges 2x2 windows")
        if not 0 <= self.image_token_id < self.llm.vocab_size:
            problems.append(f"image_token_id={self.image_token_id} outside the vocabulary of "
                            f"{self.llm.vocab_size}")
        return problems

    def _virtual_pipeline_problems(self, pipeline_parallel: int, virtual_pipeline: int) -> list:
        """megatron's interleaved split (TransformerConfig / get_num_layers_to_build asserts)."""
        if virtual_pipeline == 1:
            return []
        if pipeline_parallel < 2:
            return [f"virtual_pipeline={virtual_pipeline} needs pipeline_parallel >= 2"]
        layers, first = self.llm.num_layers, self.first_stage_llm_layers
        if first is None:
            if layers % (pipeline_parallel * virtual_pipeline):
                return [f"virtual pipeline: the language model's {layers} layers do not split "
                        f"into pipeline_parallel x virtual_pipeline = {pipeline_parallel} x "
                        f"{virtual_pipeline} equal chunks"]
            return []
        rest, stages = layers - first, pipeline_parallel - 1
        if first % virtual_pipeline or (stages and rest % stages == 0
                                        and (rest // stages) % virtual_pipeline):
            return [f"virtual pipeline: first_stage_llm_layers={first} and the other stages' "
                    f"{rest // stages if stages else 0} layers each must be multiples of "
                    f"virtual_pipeline={virtual_pipeline} (megatron splits every rank's layers "
                    "evenly into its chunks)"]
        return []

    def to_transformer_configs(self, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                               sequence_parallel: bool = False,
                               params_dtype: torch.dtype = torch.float32,
                               context_parallel: int = 1, virtual_pipeline: int = 1,
                               **overrides):
        """``(encoder TransformerConfig, language-model TransformerConfig)`` at this layout; the
        encoder's has one pipeline stage, both towers ``context_parallel``, the LM
        ``virtual_pipeline`` chunks per pipeline rank (see the module docstring)."""
        self.validate(tensor_parallel, pipeline_parallel, context_parallel, virtual_pipeline)
        vit = self.vit.to_transformer_config(tensor_parallel, 1, context_parallel,
                                             sequence_parallel, params_dtype, **overrides)
        llm_pp, llm_overrides = pipeline_parallel, dict(overrides)
        if virtual_pipeline > 1:
            llm_overrides.update(virtual_pipeline_model_parallel_size=virtual_pipeline)
        if self._uneven(pipeline_parallel):
            # Qwen3Config checks an even split; the uneven one was checked above
            llm_pp = 1
            llm_overrides.update(pipeline_model_parallel_size=pipeline_parallel,
                                 num_layers_in_first_pipeline_stage=self.first_stage_llm_layers)
        llm = self.llm.to_transformer_config(tensor_parallel, llm_pp, context_parallel,
                                             sequence_parallel, params_dtype, **llm_overrides)
        return vit, llm

    def _uneven(self, pipeline_parallel: int) -> bool:
        return self.first_stage_llm_layers is not None and pipeline_parallel > 1


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
