"""What the two FineViT-VL loaders share (Stage III region QA, SFT conversations): a packing
sampler over per-sample (ViT patches, LLM tokens) sizes, random-access reads, image decode ahead
of the consumer, packs assembled by ``pack_multimodal``, skip counts and exact resume.

    sampler (the pack) ─ read: each sample's image bytes + meta (this process, when drawn)
      ─ decode: every image of the pack at the smart_resize size of the original size the
        sampler budgeted — one DALI batch / PIL in worker processes / PIL here
      ─ encode, when the pack is consumed, in pack order: skips counted, decoded sizes checked,
        text rendered at them (the subclass) ─ pack_multimodal  →  MultimodalBatch

A subclass decides each sample's sizes (``_sample_sizes``), how a row is read (``_read``), the
original size the sampler budgeted each of its images at (``_image_sizes``) and how the meta and
decoded images become a ``MultimodalSample`` (``_encode``); rows it cannot use get sizes above the
budget, which the sampler leaves out.

Decoders, as ``PackedImageLoader``'s: ``decoder="dali"`` decodes a pack's images as one DALI batch
(``data.decode_dali_packs``; a batch DALI fails is decoded again image by image with PIL, so the
skips are PIL's), ``"pil"`` is the reference, ``"auto"`` is DALI where it imports (the choice and
why are logged). With DALI, or PIL with ``num_workers`` > 0 (a pack's images split between the
worker processes, ``data.decode_workers``), ``PACKS_AHEAD`` packs are drawn, read and decoding
while the trainer computes; with PIL and no workers nothing is drawn ahead (a pack is read and
decoded when it is asked for: the reference path). Every path gives the same packs, skips and
counts; pixels are equal between the PIL paths and within the decoder bound with DALI.

Skips. A read error (cut-off tar, bad JSON, a broken conversation) and an image that does not
decode are bad samples of the shared ``BadSampleCounter``; a sample with several images is
skipped whole when any one fails (the first failing image's reason). A decoded image whose size is
not the one the sampler budgeted (its JSON or index disagrees with the image: the placeholders and
the pack budget were computed for another size) skips the sample as ``size_mismatch`` in
``skipped``. Everything is counted when the pack is consumed, in pack order, whichever process
read or decoded it.

Resume. ``state_dict`` holds the sampler's state and the dynamic skip counts (plain ints and lists)
with a checksum of the sizes: a resumed loader yields exactly the batches the uninterrupted one
yields next, and refuses a state whose packs were formed with other sizes. With packs in flight the
sampler is ahead of the consumer: each drawn pack keeps the sampler state from before it was
drawn, and ``state_dict`` saves the one of the oldest unconsumed pack (skips are counted on
consumption only, so the counts are the consumer's too); ``load_state_dict`` and ``close`` drop
the packs in flight and rewind the sampler to that position.
"""

from __future__ import annotations

import itertools
import logging
import zlib
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_finevit.data.bad_samples import BadSampleCounter, BadSampleError
from megatron_finevit.data.decode_dali_packs import (PACKS_AHEAD, DaliPack, DaliPackDecoder,
                                                     decoder_problems, resolve_decoder)
from megatron_finevit.data.decode_pil import Normalization
from megatron_finevit.data.decode_workers import (DecodePool, DecodeSettings, LoadedSample,
                                                  decode_images)
from megatron_finevit.data.index import load_index
from megatron_finevit.data.loader import SampleReader
from megatron_finevit.data.packing import PackedBatchSampler
from megatron_finevit.data.packs_ahead import PacksAhead
from megatron_finevit.data.tasks.chat import Qwen3ChatTemplate
from megatron_finevit.data.tasks.multimodal import (MultimodalBatch, MultimodalSample,
                                                    pack_multimodal)
from megatron_finevit.data.tokenizers import QwenTokenizer

log = logging.getLogger(__name__)

_STATE_VERSION = 1


@dataclass
class _Read:
    """One sample as read when its pack was drawn: its images' bytes and meta, each image's
    original (height, width) the sampler budgeted and its smart_resize size; or the read's
    error."""

    images: list[bytes] = field(default_factory=list)
    meta: dict | None = None
    sizes: list[tuple[int, int]] = field(default_factory=list)
    targets: list[tuple[int, int]] = field(default_factory=list)
    error: BadSampleError | None = None


@dataclass
class _PackInFlight:
    """A pack drawn from the sampler, not yet consumed."""

    samples: list[int]
    sampler_state: dict                # the sampler before it was drawn: the consumer's position
    reads: list[_Read]
    decoding: list[Future | DaliPack]  # parts whose results, in order, are the pack's images

    @property
    def epoch(self) -> int:
        """The sampler pass that drew it (region QA draws its turns with it)."""
        return self.sampler_state["epoch"]

    def cancel(self) -> None:
        for part in self.decoding:
            part.cancel()


class MultimodalPackLoader(PacksAhead):
    """Infinite, resumable iterator of ``MultimodalBatch`` for one data-parallel rank.

    Args:
        shard_dir: shards + ``index.zarr`` + ``dali_index/``.
        config: the subclass's config; it has ``llm_tokens``, ``vit_tokens``, ``policy``,
            ``seed``, ``buffer_size``, ``min_fill`` and ``segment_multiple``.
        tokenizer: the Qwen tokenizer (default: ``QwenTokenizer.from_tiktoken()``).
        dp_rank, dp_size: this rank's disjoint share.
        use_draft, norm: as ``PackedImageLoader`` (``decode_pil``; ``use_draft`` is PIL's only).
        counter: shared bad-sample counter.
        decoder: "pil" (reference), "dali" or "auto" (DALI where it imports).
        num_workers: PIL: processes decoding the packs drawn ahead (0: in this process, when a
            pack is asked for); DALI: its CPU threads (0 counts as 1). ``close()`` stops them.
        dali_device: "cpu" or "mixed" (default: "mixed" iff CUDA is available).
    """

    kinds: tuple[str, ...] = ()          # what ``MultimodalBatch.label_task`` indexes
    static_skips: tuple[str, ...] = ()   # reasons decided from the sizes, listed even at 0
    dynamic_skips: tuple[str, ...] = ()  # reasons counted at load time, listed even at 0

    def __init__(self, shard_dir, config, tokenizer: QwenTokenizer | None = None, *,
                 dp_rank: int = 0, dp_size: int = 1, use_draft: bool = False,
                 norm: Normalization = Normalization(), counter: BadSampleCounter | None = None,
                 decoder: str = "pil", num_workers: int = 0, dali_device: str | None = None):
        problems = decoder_problems(decoder, num_workers, prefix="")
        if problems:
            raise ValueError("; ".join(problems))
        self.decoder, why = resolve_decoder(decoder)
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

        self._settings = DecodeSettings(config.policy, norm, use_draft)
        self._in_flight: deque[_PackInFlight] = deque()  # drawn, not yet consumed
        self._dali = (DaliPackDecoder(self._max_pack_images(), max(num_workers, 1), dali_device,
                                      norm) if self.decoder == "dali" else None)
        self._pool = DecodePool(num_workers) if num_workers and self._dali is None else None
        self._lookahead = PACKS_AHEAD if self._dali or self._pool else 0
        log.info("data %s: decoder %s (%s): %s", shard_dir, self.decoder, why, self._decode_where())

    def _max_pack_images(self) -> int:
        """The most images a pack can hold (DALI's batch size): the ViT budget over the fewest
        patches an image resizes to (sides multiples of ``factor``, area >= ``min_pixels``)."""
        policy = self.config.policy
        cells = max(1, -(-policy.min_pixels // policy.factor ** 2))
        return max(1, self.config.vit_tokens // (cells * (policy.factor // policy.patch_size) ** 2))

    # --- what a subclass decides ------------------------------------------------------------

    def _sample_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """``(sizes [n, 2] int64 (patches, LLM tokens, padding to segment_multiple included),
        reasons [n] str)``: why a row cannot be used ("" when it can)."""
        raise NotImplementedError

    def _read(self, sample: int) -> tuple[list[bytes], dict]:
        """Index row ``sample``'s encoded images (in the order its text shows them) and its
        meta; BadSampleError when it cannot be used."""
        raise NotImplementedError

    def _image_sizes(self, sample: int, meta: dict) -> list[tuple[int, int]]:
        """The original (height, width) of each image of the row, as the sampler budgeted it."""
        raise NotImplementedError

    def _encode(self, sample: int, key: str, meta: dict, images: list[torch.Tensor],
                epoch: int) -> MultimodalSample | None:
        """The row's sample from its meta and decoded images ``[3, H_i, W_i]`` (at the sizes
        budgeted); None: skipped, counted in ``skips`` under one of ``dynamic_skips``."""
        raise NotImplementedError

    # --- iteration ------------------------------------------------------------------------------

    @property
    def skipped(self) -> dict[str, int]:
        """Samples left out so far, by reason (the subclass's module docstring; plus
        ``size_mismatch`` where it is not listed and happened)."""
        return {**self._static_skips, **{r: 0 for r in self.dynamic_skips}, **self.skips}

    def __next__(self) -> MultimodalBatch:
        return self._next_loaded()

    def epoch(self):
        """The batches of the rest of the current epoch (this rank's share once)."""
        epoch = self._position()["epoch"]
        while (batch := self._next_loaded(epoch)) is not None:
            yield batch

    # --- packs in flight ----------------------------------------------------------------------

    def _draw(self, samples: list[int], sampler_state: dict) -> _PackInFlight:
        """A freshly drawn pack: read now, its images decoding (DALI, workers) or decoded."""
        reads = [self._read_or_error(s) for s in samples]
        return _PackInFlight(samples, sampler_state, reads, self._start_decoding(reads))

    def _read_or_error(self, sample: int) -> _Read:
        try:
            images, meta = self._read(sample)
            sizes = self._image_sizes(sample, meta)
            if len(sizes) != len(images):
                raise BadSampleError("image_count_mismatch", f"{len(images)} images, sizes of "
                                     f"{len(sizes)} in its JSON")
            targets = [self.config.policy.target_size(h, w) for h, w in sizes]
        except BadSampleError as err:
            return _Read(error=err)
        return _Read(images, meta, sizes, targets)

    def _start_decoding(self, reads: list[_Read]) -> list[Future | DaliPack]:
        """Decode every image of a pack's reads, in order: one DALI batch (at the smart_resize
        size of the budgeted size), one part per worker, or here and now."""
        images = [image for read in reads for image in read.images]
        if self._dali is not None:
            sizes = [size for read in reads for size in read.sizes]
            return [self._dali.submit([(image, None, size) for image, size in zip(images, sizes)],
                                      self._settings)]
        if self._pool is not None:
            part = max(1, -(-len(images) // self._pool.num_workers))
            return [self._pool.submit_images(images[i:i + part], self._settings)
                    for i in range(0, len(images), part)]
        done = Future()
        done.set_result(decode_images(images, self._settings))
        return [done]

    # --- batches ------------------------------------------------------------------------------

    def _load(self, pack: _PackInFlight) -> MultimodalBatch | None:
        decoded = iter([image for part in pack.decoding for image in part.result()])
        samples = []
        for sample, read in zip(pack.samples, pack.reads):
            loaded = list(itertools.islice(decoded, len(read.images)))
            encoded = self._finish(sample, read, loaded, pack.epoch)
            if encoded is not None:
                samples.append(encoded)
        if not samples:
            return None
        batch = pack_multimodal(samples, self.config.llm_tokens, self.config.vit_tokens,
                                self.template.pad_id, self.kinds,
                                segment_multiple=self.config.segment_multiple)
        batch.skipped = self.skipped
        return batch

    def _finish(self, sample: int, read: _Read, loaded: list[LoadedSample],
                epoch: int) -> MultimodalSample | None:
        """Count one sample of the consumed pack and encode it (None: skipped, counted)."""
        key = str(self.index.key[sample])
        if read.error is not None:
            self.counter.skip_error(read.error, member=key)
            return None
        failed = next((image for image in loaded if image.bad_reason), None)
        if failed is not None:  # one image that does not decode: the whole sample goes
            self.counter.skip(failed.bad_reason, member=key, detail=failed.bad_detail)
            return None
        self.counter.ok()
        images = [torch.from_numpy(image.pixels) for image in loaded]
        decoded = [tuple(image.shape[1:]) for image in images]
        if decoded != read.targets:
            self.skips["size_mismatch"] += 1
            log.warning("sample %s: decoded at %s, the sampler budgeted %s (from its sizes %s, "
                        "which disagree with the image); skipped", key, decoded, read.targets,
                        read.sizes)
            return None
        return self._encode(sample, key, read.meta, images, epoch)

    # --- resume -------------------------------------------------------------------------------

    def _sizes_checksum(self) -> int:
        return zlib.crc32(self.sizes.astype("<i8").tobytes())

    def state_dict(self) -> dict:
        return {"version": _STATE_VERSION, "sampler": self._position(),
                "skips": dict(self.skips), "sizes_crc32": self._sizes_checksum()}

    def load_state_dict(self, state: dict) -> None:
        """Resume; the per-sample sizes must be the saved run's (its packs were formed with
        them). Packs in flight are dropped."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported {type(self).__name__} state version "
                             f"{state.get('version')}")
        if state["sizes_crc32"] != self._sizes_checksum():
            raise ValueError("the per-sample pack sizes differ from the saved run's (data, "
                             "policy, budgets, tokenizer or text limits changed): its packs "
                             "would not fit; resume with the same data settings")
        self._drop_in_flight()
        self.sampler.load_state_dict(state["sampler"])
        self.skips = Counter({k: int(v) for k, v in state["skips"].items()})
