"""What the two FineViT-VL loaders share (Stage III region QA, SFT conversations): a packing
sampler over per-sample (ViT patches, LLM tokens) sizes, random-access reads, packs assembled by
``pack_multimodal``, skip counts and exact resume.

A subclass decides each sample's sizes (``_sample_sizes``) and how an index row becomes a
``MultimodalSample`` (``_sample``); rows it cannot use get sizes above the budget, which the
sampler leaves out. ``state_dict`` holds the sampler's state and the dynamic skip counts (plain
ints and lists) with a checksum of the sizes: a resumed loader yields exactly the batches the
uninterrupted one yields next, and refuses a state whose packs were formed with other sizes.
"""

from __future__ import annotations

import zlib
from collections import Counter

import numpy as np

from megatron_finevit.data.bad_samples import BadSampleCounter
from megatron_finevit.data.decode_pil import Normalization
from megatron_finevit.data.index import load_index
from megatron_finevit.data.loader import SampleReader
from megatron_finevit.data.packing import PackedBatchSampler
from megatron_finevit.data.tasks.chat import Qwen3ChatTemplate
from megatron_finevit.data.tasks.multimodal import (MultimodalBatch, MultimodalSample,
                                                    pack_multimodal)
from megatron_finevit.data.tokenizers import QwenTokenizer

_STATE_VERSION = 1


class MultimodalPackLoader:
    """Infinite, resumable iterator of ``MultimodalBatch`` for one data-parallel rank.

    Args:
        shard_dir: shards + ``index.zarr`` + ``dali_index/``.
        config: the subclass's config; it has ``llm_tokens``, ``vit_tokens``, ``seed``,
            ``buffer_size``, ``min_fill`` and ``segment_multiple``.
        tokenizer: the Qwen tokenizer (default: ``QwenTokenizer.from_tiktoken()``).
        dp_rank, dp_size: this rank's disjoint share.
        use_draft, norm: as ``PackedImageLoader`` (``decode_pil``).
        counter: shared bad-sample counter.
    """

    kinds: tuple[str, ...] = ()          # what ``MultimodalBatch.label_task`` indexes
    static_skips: tuple[str, ...] = ()   # reasons decided from the sizes, listed even at 0
    dynamic_skips: tuple[str, ...] = ()  # reasons counted at load time (in ``skipped``)

    def __init__(self, shard_dir, config, tokenizer: QwenTokenizer | None = None, *,
                 dp_rank: int = 0, dp_size: int = 1, use_draft: bool = False,
                 norm: Normalization = Normalization(), counter: BadSampleCounter | None = None):
        self.config = config
        self.template = Qwen3ChatTemplate(tokenizer or QwenTokenizer.from_tiktoken())
        self.index = load_index(shard_dir)
        self.reader = SampleReader(self.index)
        self.use_draft, self.norm = use_draft, norm
        self.counter = counter if counter is not None else BadSampleCounter(name=str(shard_dir))

        sizes, unusable = self._sample_sizes()
        budget = np.array([config.vit_tokens, config.llm_tokens])
        self.sizes = sizes.copy()
        oversize = (self.sizes > budget).any(axis=1) & (unusable == "")
        self.sizes[unusable != ""] = budget + 1  # the sampler leaves them out
        self._static_skips = Counter({r: 0 for r in self.static_skips})
        self._static_skips.update(r for r in unusable.tolist() if r)
        self._static_skips["oversize"] = int(oversize.sum())
        self.skips: Counter[str] = Counter()
        self.sampler = PackedBatchSampler(
            self.sizes, budget, buffer_size=config.buffer_size, seed=config.seed,
            dp_rank=dp_rank, dp_size=dp_size, min_fill=config.min_fill)

    # --- what a subclass decides ------------------------------------------------------------

    def _sample_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """``(sizes [n, 2] int64 (patches, LLM tokens, padding to segment_multiple included),
        reasons [n] str)``: why a row cannot be used ("" when it can)."""
        raise NotImplementedError

    def _sample(self, sample: int, epoch: int) -> MultimodalSample | None:
        """Index row ``sample`` read and encoded (None: skipped and counted)."""
        raise NotImplementedError

    # --- iteration ------------------------------------------------------------------------------

    @property
    def skipped(self) -> dict[str, int]:
        """Samples left out so far, by reason (the subclass's module docstring)."""
        return {**self._static_skips, **{r: self.skips[r] for r in self.dynamic_skips}}

    def __iter__(self):
        return self

    def __next__(self) -> MultimodalBatch:
        while True:
            epoch = self.sampler.epoch  # before the draw: the last pack of an epoch rolls it
            batch = self._load(next(iter(self.sampler)), epoch)
            if batch is not None:
                return batch

    def epoch(self):
        """The batches of the rest of the current epoch (this rank's share once)."""
        epoch = self.sampler.epoch
        for pack in self.sampler:
            batch = self._load(pack, epoch)
            if batch is not None:
                yield batch

    def _load(self, pack: list[int], epoch: int) -> MultimodalBatch | None:
        samples = [s for s in (self._sample(i, epoch) for i in pack) if s is not None]
        if not samples:
            return None
        batch = pack_multimodal(samples, self.config.llm_tokens, self.config.vit_tokens,
                                self.template.pad_id, self.kinds,
                                segment_multiple=self.config.segment_multiple)
        batch.skipped = self.skipped
        return batch

    # --- resume -------------------------------------------------------------------------------

    def _sizes_checksum(self) -> int:
        return zlib.crc32(self.sizes.astype("<i8").tobytes())

    def state_dict(self) -> dict:
        return {"version": _STATE_VERSION, "sampler": self.sampler.state_dict(),
                "skips": dict(self.skips), "sizes_crc32": self._sizes_checksum()}

    def load_state_dict(self, state: dict) -> None:
        """Resume; the per-sample sizes must be the saved run's (its packs were formed with
        them)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported {type(self).__name__} state version "
                             f"{state.get('version')}")
        if state["sizes_crc32"] != self._sizes_checksum():
            raise ValueError("the per-sample pack sizes differ from the saved run's (data, "
                             "policy, budgets, tokenizer or text limits changed): its packs "
                             "would not fit; resume with the same data settings")
        self.sampler.load_state_dict(state["sampler"])
        self.skips = Counter({k: int(v) for k, v in state["skips"].items()})
