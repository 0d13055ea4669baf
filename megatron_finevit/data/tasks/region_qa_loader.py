"""Resumable loader of packed Stage III region-QA micro-batches for one data-parallel rank.

    shard dir + index.zarr ─ per-sample sizes (ViT patches, LLM tokens) ─ PackedBatchSampler
      ─ random-access reads (SampleReader) ─ decode at the Stage III policy (≤ 1000²; DALI or
      PIL, ahead of the consumer: ``pack_loader``) ─ draw_turns ─ Qwen3 chat tokens
      ─ pack_multimodal  →  MultimodalBatch

Sizes come from the zarr index only (no JSON is read before packing). ViT patches are exact:
``smart_resize`` of the indexed original size under the loader's policy (images whose aspect
exceeds the policy's bound are rejected by ``smart_resize``'s rules and counted). The LLM length
of a conversation is only known once its text is rendered, so each sample gets an *allowance*
decided before packing and the renderer fills it exactly:

    llm_tokens_i = image_i + min(max_text_tokens, estimate_i)
    image_i      = patches_i / 4 + 2                      (placeholders + vision start/end)
    estimate_i   = turns_i · turn_overhead + caption_tokens + region_tokens + ocr_tokens
                   + (num_regions + num_ocr) · box_tokens

with ``turns_i = min(max_turns, annotations)``, the token columns of the index, and
``turn_overhead`` / ``box_tokens`` measured once with the real tokenizer (the longest paraphrase
with its chat markers; the widest box). At load time the drawn turns are kept in order while the
sample stays within its allowance (``Qwen3ChatTemplate.encode(max_tokens=…)``). So a pack never
exceeds the budget — the sampler keeps Σ allowances ≤ T and every sample stays within its own —
whatever the index's token counter was; a better counter (the Qwen tokenizer's, at index build)
only makes the allowances tighter. The slack of an allowance becomes padding.

Skips, counted in ``skipped`` (the static ones over the whole index, at construction):
``oversize`` (patches > ViT budget or allowance > LLM budget), ``resize_rejected`` (aspect
ratio), ``no_task`` (nothing the mixture can ask about), ``no_turn_fits`` (no drawn turn fits the
allowance), and ``size_mismatch`` only if an image decodes at another size than its indexed one
(``pack_loader``); unreadable or undecodable samples go to the shared ``BadSampleCounter`` as in
``PackedImageLoader``.

Determinism and resume: packs are the sampler's (DP-disjoint, seeded); a sample's turns are drawn
from (seed, key, epoch) — the epoch of the pass that drew the pack — so they do not depend on
the packing either. ``state_dict`` holds the sampler's state and the skip counts (plain ints and
lists): a resumed loader yields exactly the batches the uninterrupted one yields next, also with
packs decoding ahead (``pack_loader``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from megatron_finevit.data.index import SampleIndex
from megatron_finevit.data.loader import policy_sizes
from megatron_finevit.data.resize import STAGE_MAX_PIXELS, ResizePolicy
from megatron_finevit.data.tasks.boxes import RELATIVE, RELATIVE_SCALE, BoxCodec
from megatron_finevit.data.tasks.chat import Qwen3ChatTemplate, Turn
from megatron_finevit.data.tasks.multimodal import (MERGE_WINDOW, MultimodalSample,
                                                    image_llm_tokens)
from megatron_finevit.data.tasks.pack_loader import MultimodalPackLoader
from megatron_finevit.data.tasks.region_qa import PARAPHRASES, TASK_KINDS, TaskMixture, draw_turns
from megatron_finevit.data.tokenizers import QwenTokenizer

_VISION_MARKERS = 2  # <|vision_start|>, <|vision_end|>


@dataclasses.dataclass(frozen=True)
class RegionQAConfig:
    """Stage III data settings.

    llm_tokens / vit_tokens: fixed LLM tokens and ViT patches per pack.
    max_text_tokens: cap of one image's text allowance (its turns, chat markers included).
    max_turns: QA turns drawn per image.
    box_coords: "relative" (0–1000, default) or "absolute" (resized-image pixels).
    mixture: task-kind weights.
    policy: resize policy (Stage III: images within 1000×1000).
    seed, buffer_size, min_fill: the packing sampler's (``PackedBatchSampler``).
    segment_multiple: every sample padded to a multiple of this many LLM tokens (2·cp under
        context parallelism; ``pack_multimodal``): allowances are rounded up to it, so the
        padded samples still fit the budget.
    """

    llm_tokens: int = 4096
    vit_tokens: int = 16384
    max_text_tokens: int = 1024
    max_turns: int = 8
    box_coords: str = RELATIVE
    mixture: TaskMixture = TaskMixture()
    policy: ResizePolicy = ResizePolicy(max_pixels=STAGE_MAX_PIXELS["align"])
    seed: int = 0
    buffer_size: int = 512
    min_fill: float = 0.9
    segment_multiple: int = 1

    def __post_init__(self):
        for name in ("llm_tokens", "vit_tokens", "max_text_tokens", "max_turns", "buffer_size",
                     "segment_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.llm_tokens % self.segment_multiple:
            raise ValueError(f"llm_tokens={self.llm_tokens} must be a multiple of "
                             f"segment_multiple={self.segment_multiple}")
        BoxCodec(self.box_coords)  # validates the name


def turn_costs(template: Qwen3ChatTemplate, codec: BoxCodec, policy: ResizePolicy
               ) -> tuple[int, int]:
    """(tokens of the longest turn without its content, tokens of the widest box text)."""
    overhead = max(len(template.encode([Turn(p.format(box="", text=""), "")]))
                   for prompts in PARAPHRASES.values() for p in prompts)
    # No coordinate exceeds 1000 (relative) or a side of max_pixels / factor pixels (absolute).
    widest = RELATIVE_SCALE if codec.coords == RELATIVE else policy.max_pixels // policy.factor
    digits = 10 ** len(str(widest)) - 1
    return overhead, len(template.tokenizer.encode(codec.format((digits,) * 4)))


def llm_allowances(index: SampleIndex, patches: np.ndarray, config: RegionQAConfig,
                   turn_overhead: int, box_tokens: int) -> np.ndarray:
    """int64 ``[n]`` LLM tokens reserved per sample (module docstring formula)."""
    annotations = ((index.caption_tokens > 0).astype(np.int64) + index.num_regions
                   + index.num_ocr)
    turns = np.minimum(config.max_turns, annotations)
    estimate = (turns * turn_overhead + index.caption_tokens + index.region_tokens
                + index.ocr_tokens + (index.num_regions + index.num_ocr) * box_tokens)
    text = np.clip(estimate.astype(np.int64), 1, config.max_text_tokens)
    allowance = patches // MERGE_WINDOW + _VISION_MARKERS + text
    return -(-allowance // config.segment_multiple) * config.segment_multiple


class RegionQALoader(MultimodalPackLoader):
    """Infinite, resumable iterator of region-QA ``MultimodalBatch`` for one data-parallel rank
    (arguments: ``MultimodalPackLoader``'s, ``config`` a ``RegionQAConfig``)."""

    kinds = TASK_KINDS
    static_skips = ("resize_rejected",)
    dynamic_skips = ("no_task", "no_turn_fits")

    def __init__(self, shard_dir, config: RegionQAConfig = RegionQAConfig(),
                 tokenizer: QwenTokenizer | None = None, **kwargs):
        self.codec = BoxCodec(config.box_coords)
        super().__init__(shard_dir, config, tokenizer, **kwargs)

    def _sample_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        config = self.config
        patches = policy_sizes(self.index, config.policy, reject_size=0)
        sizes = np.stack([patches, llm_allowances(
            self.index, patches, config, *turn_costs(self.template, self.codec, config.policy))],
            axis=1)
        return sizes, np.where(patches == 0, "resize_rejected", "")

    def _read(self, sample: int) -> tuple[list[bytes], dict]:
        image_bytes, meta = self.reader.read(sample)
        return [image_bytes], meta

    def _image_sizes(self, sample: int, meta: dict) -> list[tuple[int, int]]:
        return [(int(self.index.height[sample]), int(self.index.width[sample]))]

    def _encode(self, sample: int, key: str, meta: dict, images: list[torch.Tensor],
                epoch: int) -> MultimodalSample | None:
        (image,) = images
        turns = draw_turns(meta, original_hw=(meta["height"], meta["width"]),
                           resized_hw=tuple(image.shape[1:]), codec=self.codec,
                           mixture=self.config.mixture, seed=self.config.seed, key=key,
                           step=epoch, max_turns=self.config.max_turns)
        if not turns:
            self.skips["no_task"] += 1
            return None
        conversation = self.template.encode(turns, image_llm_tokens(image),
                                            max_tokens=int(self.sizes[sample, 1]))
        if not conversation.turns:
            self.skips["no_turn_fits"] += 1
            return None
        return MultimodalSample(key, [image], conversation)
