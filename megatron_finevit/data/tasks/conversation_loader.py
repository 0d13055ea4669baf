"""Resumable loader of packed SFT conversation micro-batches for one data-parallel rank.

    shard dir + index.zarr (tools/import_conversations.py + tools/build_index.py)
      ─ exact (ViT patches, LLM tokens) per conversation ─ PackedBatchSampler
      ─ random-access reads of every image (SampleReader.read_images) ─ decode at the policy
      (DALI or PIL, ahead of the consumer: ``pack_loader``) ─ Qwen3 chat tokens
      (chat.encode_messages) ─ pack_multimodal  →  MultimodalBatch

Exact sizes. A conversation's LLM length is known only once it is rendered, and nothing may be
truncated, so the loader measures every conversation once before packing: it reads each
sample's JSON (one ``pread``, no image decoded), checks the conversation's rules and renders it
with the run's tokenizer at the loader's resize policy (each image's size from its JSON). The
result ``[n, 2]`` (patches, tokens) is cached next to the index in ``sft_sizes/`` under a name
that fingerprints everything it depends on (the indexed shards, the policy, the tokenizer), so
later runs and the other ranks read it instead (written atomically: concurrent writers of the
same file are harmless). A text-only conversation is charged one ViT patch: the sampler's sizes
are positive, and it costs at most one patch of budget per such sample.

Skips, counted in ``skipped``: ``oversize`` (more patches or tokens than a pack holds: never
truncated), the resize policy's refusals (``extreme_aspect_ratio``, ``degenerate_size``), and the
conversation rules' reasons (``conversation.check_messages``: ``roles_not_alternating``,
``image_count_mismatch``, ...) — all decided at measurement, over the whole set; unreadable or
undecodable images at load time go to the shared ``BadSampleCounter`` as in
``PackedImageLoader`` (one image that fails skips its whole conversation; a JSON listing another
number of images than the sample holds is ``image_count_mismatch``), and ``size_mismatch`` counts
a conversation with an image whose decoded size disagrees with its JSON (its placeholders would
not match). The decoders are given the JSON's sizes, as the measurement was.

Per-sample kinds (for ``loss_<kind>`` logs): ``text`` (no image), ``image``, ``multi_image``, and
``reasoning`` for any conversation whose answers hold a ``<think>`` block.

Determinism and resume (``pack_loader.MultimodalPackLoader``): packs are the sampler's (DP-disjoint, seeded), a
sample's tokens depend on nothing else, and ``state_dict`` is the sampler's state plus the skip
counts: a resumed loader yields exactly the batches the uninterrupted one yields next.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megatron_finevit.data.bad_samples import BadSampleError
from megatron_finevit.data.index import SampleIndex
from megatron_finevit.data.loader import SampleReader
from megatron_finevit.data.resize import STAGE_MAX_PIXELS, ResizePolicy
from megatron_finevit.data.tasks.chat import Qwen3ChatTemplate
from megatron_finevit.data.tasks.conversation import image_token_counts, messages_from_meta
from megatron_finevit.data.tasks.multimodal import MultimodalSample, image_llm_tokens
from megatron_finevit.data.tasks.pack_loader import MultimodalPackLoader
from megatron_finevit.data.tokenizers import QwenTokenizer

_SIZES_DIR = "sft_sizes"
_SIZES_VERSION = 1  # bump when the rendering changes what a conversation costs
CONVERSATION_KINDS = ("text", "image", "multi_image", "reasoning")


@dataclasses.dataclass(frozen=True)
class ConversationConfig:
    """SFT data settings.

    llm_tokens / vit_tokens: fixed LLM tokens and ViT patches per pack (paper: 4,096 in phase I,
    10,240 in phase II). policy: resize policy of every image. seed, buffer_size, min_fill: the
    packing sampler's (``PackedBatchSampler``). segment_multiple: every conversation padded to a
    multiple of this many LLM tokens (2·cp under context parallelism; ``pack_multimodal``) — its
    size is rounded up alike, so padded conversations still fit.
    """

    llm_tokens: int = 4096
    vit_tokens: int = 16384
    policy: ResizePolicy = ResizePolicy(max_pixels=STAGE_MAX_PIXELS["align"])
    seed: int = 0
    buffer_size: int = 512
    min_fill: float = 0.9
    segment_multiple: int = 1

    def __post_init__(self):
        for name in ("llm_tokens", "vit_tokens", "buffer_size", "segment_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.llm_tokens % self.segment_multiple:
            raise ValueError(f"llm_tokens={self.llm_tokens} must be a multiple of "
                             f"segment_multiple={self.segment_multiple}")


def conversation_kind(meta: dict) -> str:
    """The sample's kind (module docstring)."""
    assistant_text = " ".join(piece.get("text", "") for turn in meta["conversation"]
                              if turn.get("role") == "assistant" for piece in turn["content"])
    if "<think>" in assistant_text:
        return "reasoning"
    images = len(meta.get("images", []))
    return "text" if images == 0 else "image" if images == 1 else "multi_image"


def _measure(meta: dict, template: Qwen3ChatTemplate, policy: ResizePolicy) -> tuple[int, int]:
    """(ViT patches, LLM tokens) of one conversation sample (BadSampleError when broken)."""
    messages = messages_from_meta(meta)
    image_tokens = image_token_counts(meta, policy)  # BadSampleError when the policy refuses
    tokens = len(template.encode_messages(messages, image_tokens).ids)
    return max(1, 4 * sum(image_tokens)), tokens


def _sizes_cache_path(index: SampleIndex, policy: ResizePolicy,
                      tokenizer: QwenTokenizer) -> Path:
    """Where the measured sizes of ``index`` under ``policy`` and ``tokenizer`` are cached."""
    from megatron_finevit.data.index import INDEX_NAME

    import zarr

    attrs = dict(zarr.open_group(str(Path(index.shard_dir) / INDEX_NAME), mode="r").attrs)
    fingerprint = json.dumps({"shards": attrs.get("shards"), "policy": policy.to_dict(),
                              "tokenizer": tokenizer.fingerprint(), "version": _SIZES_VERSION},
                             sort_keys=True)
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    return Path(index.shard_dir) / _SIZES_DIR / f"{digest}.npz"


def measure_conversations(index: SampleIndex, reader: SampleReader,
                          template: Qwen3ChatTemplate, policy: ResizePolicy
                          ) -> tuple[np.ndarray, list[str]]:
    """``(sizes [n, 2] int64, reasons [n])``: each sample's (patches, tokens), or ``(0, 0)`` and
    why it cannot be used ("" when it can); read from the cache when it is there."""
    path = _sizes_cache_path(index, policy, template.tokenizer)
    if path.is_file():
        with np.load(path, allow_pickle=False) as cached:
            return cached["sizes"], [str(r) for r in cached["reasons"]]
    sizes = np.zeros((len(index.key), 2), dtype=np.int64)
    reasons = [""] * len(index.key)
    for sample in tqdm(range(len(index.key)), desc="measuring conversations", unit="sample",
                       disable=None, mininterval=5.0):
        try:
            _, meta = reader.read_images(sample)
            sizes[sample] = _measure(meta, template, policy)
        except BadSampleError as err:
            reasons[sample] = err.reason
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, sizes=sizes, reasons=np.asarray(reasons, dtype=str))
    os.replace(tmp, path)
    return sizes, reasons


class ConversationLoader(MultimodalPackLoader):
    """Infinite, resumable iterator of SFT ``MultimodalBatch`` for one data-parallel rank
    (arguments: ``MultimodalPackLoader``'s, ``config`` a ``ConversationConfig``)."""

    kinds = CONVERSATION_KINDS
    dynamic_skips = ("size_mismatch",)

    def __init__(self, shard_dir, config: ConversationConfig = ConversationConfig(),
                 tokenizer: QwenTokenizer | None = None, **kwargs):
        super().__init__(shard_dir, config, tokenizer, **kwargs)

    def _sample_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        sizes, reasons = measure_conversations(self.index, self.reader, self.template,
                                               self.config.policy)
        multiple = self.config.segment_multiple
        sizes[:, 1] = -(-sizes[:, 1] // multiple) * multiple
        return sizes, np.asarray(reasons, dtype=str)

    def _read(self, sample: int) -> tuple[list[bytes], dict]:
        images, meta = self.reader.read_images(sample)
        messages_from_meta(meta)  # a broken conversation is a bad read: nothing to decode
        return images, meta

    def _image_sizes(self, sample: int, meta: dict) -> list[tuple[int, int]]:
        return [(int(image["height"]), int(image["width"])) for image in meta.get("images", [])]

    def _encode(self, sample: int, key: str, meta: dict, images: list[torch.Tensor],
                epoch: int) -> MultimodalSample:
        conversation = self.template.encode_messages(
            messages_from_meta(meta), [image_llm_tokens(image) for image in images],
            kind=conversation_kind(meta))
        return MultimodalSample(key, images, conversation)
