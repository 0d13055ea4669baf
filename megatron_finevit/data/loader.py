"""Per-stage, resumable loader of packed image(+caption) micro-batches for one data-parallel rank.

    shard dir + index.zarr ─ sizes under the current ResizePolicy ─ PackedBatchSampler (fixed pack)
      ─ random-access reads of the pack's samples (tar offsets) ─ decode + smart_resize (DALI
      or PIL) ─ PackedImages padded to ``pack_tokens`` (+ captions, keys, Stage I MIM masks)

Decoders. ``decoder="dali"`` decodes each pack in a DALI pipeline fed by external sources (the
encoded bytes and the exact smart_resize size; ``data.decode_dali_packs``), ``PACKS_AHEAD`` packs
ahead of the consumer; ``"pil"`` is the reference; ``"auto"`` is DALI where it imports. Both give
the same packs, skips and counts, and pixels within the decoder bound.

Decode workers. With ``num_workers`` > 0 the reads and decodes run in worker processes
(``data.decode_workers``) while the trainer computes: the sampler draws packs ahead (up to
``PACKS_IN_FLIGHT_PER_WORKER`` per worker), each pack goes to a worker as its samples' tar
locations, and the packs are consumed in the order drawn. The pack decision, bad-sample counting
and pack assembly stay here, so the packs, pixels and counts equal ``num_workers=0`` (which reads
and decodes in this process when a pack is asked for, nothing ahead).

Sizes. Every sample's token cost is recomputed from its original ``height``/``width`` in the
index under the policy of the current *phase*, so a resolution schedule (Stage II: max 336² →
448²) changes ``max_pixels`` at a step boundary without re-indexing. ``smart_resize`` is evaluated
once per distinct original size (real data sets repeat sizes a lot). Samples the policy rejects
(aspect ratio) get a size above the pack and the sampler skips and counts them. Under context
parallelism the encoder pads every image to a multiple of 2·cp (``prepare_encoder_input``), so
the cost budgeted is the token count rounded up to ``token_multiple`` (2·cp): the padded pack
must fit ``pack_tokens``, not only its real tokens.

Random access. ``build_index`` writes, next to ``index.zarr``, DALI index files listing each
usable sample's tar members as ``ext offset size name`` in index row order; the loader reads a
sample with two ``pread``s from those offsets (no tar scan, nothing extracted).

Phases and resume. ``phases`` is a list of ``(start_step, ResizePolicy)``; ``set_step(step)``
(called by the stage before each step) switches phase when ``step`` crosses a start. Each phase has
its own sampler (sizes differ), seeded by (seed, phase), starting at its first epoch. ``state_dict``
holds the phase and its sampler's state (plain ints and lists), so a resumed run yields exactly the
packs the uninterrupted one would have. MIM masks are drawn from a generator seeded by (seed,
dp_rank, phase, pack number), so they need no state of their own. With packs in flight the
sampler is ahead of the consumer: each drawn pack keeps the sampler state from before it was
drawn, and ``state_dict`` saves the one of the oldest unconsumed pack (the consumer's position);
on a phase switch, ``load_state_dict`` and ``close`` the packs in flight are dropped and the
sampler rewound to that position.

Pipeline parallelism: ranks that need no pixels (middle pipeline stages) pass
``decode_pixels=False``; they get the same pack layout with zero patches. With a ``pipeline``
group the first stage's loader decides each micro-batch's contents (what decoded) and the others
follow it (``data.pack_agreement``); the stages agree on a step's micro-batches in ``prepare(n)``
before megatron's schedule runs, and on a whole split in ``epoch()``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from megatron_finevit.data.bad_samples import BadSampleCounter, BadSampleError
from megatron_finevit.data.decode_dali_packs import (
    PACKS_AHEAD,
    DaliPack,
    DaliPackDecoder,
    resolve_decoder,
)
from megatron_finevit.data.decode_pil import Normalization
from megatron_finevit.data.decode_workers import (
    PACKS_IN_FLIGHT_PER_WORKER,
    DecodePool,
    DecodeSettings,
    LoadedSample,
    SampleLocation,
    ShardFiles,
    load_samples,
)
from megatron_finevit.data.index import SampleIndex, dali_index_path, load_index
from megatron_finevit.data.masking import random_patch_mask
from megatron_finevit.data.pack_agreement import (
    Decision,
    PackChoice,
    PipelineGroup,
    broadcast_decision,
)
from megatron_finevit.data.packs_ahead import PacksAhead
from megatron_finevit.data.packing import PackedBatchSampler
from megatron_finevit.data.resize import ResizePolicy
from megatron_finevit.data.shards import IMAGE_EXTS
from megatron_finevit.models.vit.patch_embed import PackedImages, pack_images

log = logging.getLogger(__name__)

_STATE_VERSION = 1


@dataclass
class PackedImageBatch:
    """One micro-batch: a fixed-size pack of images and what goes with them.

    packed: ``PackedImages`` with ``patches [pack_tokens, 3·14·14]`` (zeros when pixels were not
        decoded), ``cu_seqlens`` (images, then one padding segment) and ``grids [n, 2]``.
    images: the decoded images ``[3, H_i, W_i]`` (student-normalised), or None without pixels.
    captions, keys, metas: per image, in pack order (metas: the validated sample JSON).
    mim_mask: bool ``[N]`` over the real patch tokens (Stage I), or None.
    samples: per image, its row in the index.
    pack_number: the pack's number in its sampler's stream (seeds the mask).
    """

    packed: PackedImages
    images: list[torch.Tensor] | None
    captions: list[str]
    keys: list[str]
    metas: list[dict]
    mim_mask: torch.Tensor | None
    samples: list[int]
    pack_number: int

    @property
    def choice(self) -> PackChoice:
        """What other pipeline stages need to build the same pack."""
        return PackChoice(self.pack_number, tuple(self.samples),
                          tuple(tuple(g) for g in self.packed.grids.tolist()))

    @property
    def num_images(self) -> int:
        return self.packed.num_images

    @property
    def image_tokens(self) -> list[int]:
        return self.packed.image_lengths


def policy_sizes(index: SampleIndex, policy: ResizePolicy, reject_size: int,
                 token_multiple: int = 1) -> np.ndarray:
    """Patch tokens ``[n]`` int64 of every indexed sample under ``policy``, rounded up to
    ``token_multiple`` (``reject_size`` for samples the policy refuses)."""
    pairs = np.stack([index.height, index.width], axis=1).astype(np.int64)
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    tokens = np.empty(len(unique), dtype=np.int64)
    for i, (h, w) in enumerate(unique.tolist()):
        try:
            tokens[i] = -(-policy.num_patches(h, w) // token_multiple) * token_multiple
        except BadSampleError:
            tokens[i] = reject_size
    return tokens[inverse.reshape(-1)]


class SampleReader:
    """Random access to indexed samples via tar offsets: ``read(i) -> (image bytes, meta)`` (its
    first image), ``read_images(i) -> ([image bytes], meta)`` (all of a conversation's images,
    in order; none for a text-only sample)."""

    def __init__(self, index: SampleIndex):
        self.index = index
        self._members: list[list[_MemberRow]] = []  # per shard, per row
        for name in index.shards:
            self._members.append(_read_member_table(dali_index_path(index.shard_dir, name)))
        starts = np.zeros(len(index.shards) + 1, dtype=np.int64)
        np.add.at(starts, index.shard_id.astype(np.int64) + 1, 1)
        self._row_start = np.cumsum(starts)
        self._files = ShardFiles()
        for shard, members in enumerate(self._members):
            expected = int(self._row_start[shard + 1] - self._row_start[shard])
            if len(members) != expected:
                raise RuntimeError(f"{dali_index_path(index.shard_dir, index.shards[shard])} "
                                   f"lists {len(members)} samples, index.zarr {expected}: rebuild "
                                   "the index (tools/build_index.py)")

    def _row(self, sample: int) -> tuple[str, _MemberRow]:
        shard = int(self.index.shard_id[sample])
        return (str(self.index.shard_path(sample)),
                self._members[shard][sample - int(self._row_start[shard])])

    def locate(self, sample: int) -> SampleLocation:
        """The tar members of index row ``sample``'s first image and JSON (what a decode worker
        reads); BadSampleError ("missing_image") for a text-only sample."""
        path, (images, json_member) = self._row(sample)
        key = str(self.index.key[sample])
        if not images:
            raise BadSampleError("missing_image", f"sample {key} has no image")
        return SampleLocation(path, key, *images[0], *json_member)

    def read(self, sample: int) -> tuple[bytes, dict]:
        return self._files.read(self.locate(sample))

    def read_images(self, sample: int) -> tuple[list[bytes], dict]:
        """Every image member of row ``sample`` in order, and its validated meta."""
        path, (images, json_member) = self._row(sample)
        key = str(self.index.key[sample])
        return self._files.read_members(path, key, images, json_member)

    def close(self) -> None:
        self._files.close()


# (image members [(offset, size)] in order, JSON member (offset, size)) of one index row
_MemberRow = tuple[list[tuple[int, int]], tuple[int, int]]


def _read_member_table(path: Path) -> list[_MemberRow]:
    """Per line of a DALI index file, its image members in order (``jpg``, ``1.png``, ... —
    ``data/shards.py``) and its JSON member."""
    lines = path.read_text().splitlines()
    table = []
    for line in lines[1:]:
        fields = line.split()
        members = [(fields[i], int(fields[i + 1]), int(fields[i + 2]))
                   for i in range(0, len(fields), 4)]
        images = [(offset, size) for ext, offset, size in members
                  if ext.rsplit(".", 1)[-1] in IMAGE_EXTS]
        json_member = next((offset, size) for ext, offset, size in members if ext == "json")
        table.append((images, json_member))
    return table


@dataclass
class _PackInFlight:
    """A pack drawn from the sampler, not yet consumed."""

    number: int                   # its number in the sampler's stream (seeds the mask)
    samples: list[int]
    sampler_state: dict           # the sampler before it was drawn: the consumer's position
    settings: DecodeSettings      # the phase it was drawn in
    future: Future | DaliPack | None  # loading in a worker / DALI; None: load when consumed

    @property
    def epoch(self) -> int:
        return self.sampler_state["epoch"]

    def cancel(self) -> None:
        if self.future is not None:
            self.future.cancel()


class PackedImageLoader(PacksAhead):
    """Infinite, resumable iterator of ``PackedImageBatch`` for one data-parallel rank.

    Args:
        shard_dir: shards + ``index.zarr`` + ``dali_index/`` (``tools/build_index.py``).
        phases: ``[(start_step, ResizePolicy)]``, first start 0, increasing.
        pack_tokens: fixed tokens per pack (pipeline shapes stay fixed; must hold the largest
            image of every phase).
        dp_rank, dp_size: this rank's disjoint share (``PackedBatchSampler``).
        mask_ratio: draw a Stage I mask per image (None: no masks).
        decode_pixels: False on ranks that only need the layout (middle pipeline stages).
        token_multiple: each image costs its tokens rounded up to this in the pack budget (2·cp
            under context parallelism, which pads every image so).
        pipeline: this replica's pipeline group under pipeline parallelism (the first stage's
            loader decides the packs, the others follow); None without.
        use_draft: let libjpeg decode at a reduced scale when the target is much smaller
            (faster, slightly different pixels; ``decode_pil``).
        decoder: "pil" (reference), "dali" or "auto" (DALI where it imports; the choice and
            why are logged). ``use_draft`` is PIL's only (DALI has no reduced-scale decode).
        num_workers: PIL: processes that read and decode packs ahead of the consumer (0: in this
            process, when a pack is asked for); DALI: its CPU threads (0 counts as 1; DALI always
            decodes ahead). Only ranks that decode pixels start them; ``close()`` stops them.
        dali_device: "cpu" or "mixed" (default: "mixed" iff CUDA is available).
        fill_tokens: per phase, the tokens the sampler fills a pack with (default: all
            ``pack_tokens``; fewer: the rest is padding). ``samples_per_step`` sets it so that a
            step's whole packs hold the configured samples (``training.batch_schedule``).
    """

    def __init__(self, shard_dir, phases: list[tuple[int, ResizePolicy]], pack_tokens: int, *,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, buffer_size: int = 512,
                 min_fill: float = 0.9, mask_ratio: float | None = None,
                 decode_pixels: bool = True, decoder: str = "pil", use_draft: bool = False,
                 norm: Normalization = Normalization(), counter: BadSampleCounter | None = None,
                 token_multiple: int = 1, pipeline: PipelineGroup | None = None,
                 num_workers: int = 0, dali_device: str | None = None,
                 fill_tokens: Sequence[int] | None = None):
        self.decoder, why = resolve_decoder(decoder)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} must be an integer >= 0 (0: decode "
                             "in the training process)")
        starts = [start for start, _ in phases]
        if not phases or starts[0] != 0 or starts != sorted(set(starts)):
            raise ValueError(f"phases must start at step 0 with increasing steps, got {starts}")
        if pipeline is not None and pipeline.is_leader and not decode_pixels:
            raise ValueError("the first pipeline stage decides what decodes: it needs "
                             "decode_pixels=True")
        self.index = load_index(shard_dir)
        self.reader = SampleReader(self.index)
        self.phases, self.pack_tokens = list(phases), int(pack_tokens)
        self.fill_tokens = [int(t) for t in fill_tokens] if fill_tokens else \
            [self.pack_tokens] * len(self.phases)
        if len(self.fill_tokens) != len(self.phases) or \
                not all(0 < t <= self.pack_tokens for t in self.fill_tokens):
            raise ValueError(f"fill_tokens={self.fill_tokens} must give one budget in "
                             f"(0, pack_tokens={self.pack_tokens}] per phase")
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.buffer_size, self.min_fill, self.mask_ratio = buffer_size, min_fill, mask_ratio
        self.decode_pixels, self.norm, self.use_draft = decode_pixels, norm, use_draft
        self.counter = counter if counter is not None else BadSampleCounter(name=str(shard_dir))
        self.token_multiple, self.pipeline = int(token_multiple), pipeline
        self._prepared: deque[PackedImageBatch] = deque()  # agreed on, not yet consumed
        self._in_flight: deque[_PackInFlight] = deque()     # drawn, not yet consumed
        # layout-only ranks read a few bytes of JSON per sample: nothing worth a worker
        use_dali = self.decoder == "dali" and decode_pixels
        self._pool = DecodePool(num_workers) if num_workers and decode_pixels and not use_dali \
            else None
        self._dali = DaliPackDecoder(self._max_pack_images(), max(num_workers, 1), dali_device,
                                     norm) if use_dali else None
        self._lookahead = (num_workers * PACKS_IN_FLIGHT_PER_WORKER if self._pool
                           else PACKS_AHEAD if self._dali else 0)
        self.prepare_wait_s = 0.0  # time spent loading in prepare() (the trainer's data_wait)
        self.phase = -1
        self.sampler: PackedBatchSampler | None = None
        self._enter_phase(0)
        log.info("data %s: decoder %s (%s): %s", shard_dir, self.decoder, why,
                 self._decode_where() if decode_pixels else "layout only, no pixels")

    def _max_pack_images(self) -> int:
        """The most images a pack can hold in any phase (DALI's batch size)."""
        smallest = min(int(policy_sizes(self.index, policy, self.pack_tokens + 1,
                                        self.token_multiple).min()) for _, policy in self.phases)
        return self.pack_tokens // max(smallest, 1)

    # --- phases -------------------------------------------------------------------------------

    @property
    def policy(self) -> ResizePolicy:
        return self.phases[self.phase][1]

    def phase_at(self, step: int) -> int:
        return max(i for i, (start, _) in enumerate(self.phases) if start <= step)

    def set_step(self, step: int) -> None:
        """Switch to the phase ``step`` belongs to (at a step boundary)."""
        phase = self.phase_at(step)
        if phase != self.phase:
            self._enter_phase(phase)
            log.info("data: step %d enters phase %d (max_pixels %d)", step, phase,
                     self.policy.max_pixels)

    def _enter_phase(self, phase: int) -> None:
        self._drop_in_flight()  # drawn at the old phase's sizes
        self.phase = phase
        sizes = policy_sizes(self.index, self.policy, self.pack_tokens + 1, self.token_multiple)
        self.sampler = PackedBatchSampler(
            sizes, self.fill_tokens[phase], buffer_size=self.buffer_size,
            seed=self.seed * 1000 + phase,
            dp_rank=self.dp_rank, dp_size=self.dp_size, min_fill=self.min_fill)
        self._sizes = sizes

    # --- iteration ----------------------------------------------------------------------------

    def __next__(self) -> PackedImageBatch:
        if self._prepared:
            return self._prepared.popleft()
        if self.pipeline is not None:
            raise RuntimeError("under pipeline parallelism the stages agree on a step's "
                               "micro-batches first: call prepare(n) on every stage before "
                               "the schedule")
        return self._next_loaded()

    def prepare(self, num_batches: int) -> None:
        """Under pipeline parallelism: agree with the other stages on the next ``num_batches``
        micro-batches and queue them for ``next()`` (a collective over the pipeline group: every
        stage calls it, outside megatron's schedule). Without a pipeline group nothing happens:
        ``next()`` loads as it goes."""
        if self.pipeline is None:
            return
        if self._prepared:
            raise RuntimeError(f"{len(self._prepared)} prepared micro-batches were not consumed")
        start = time.perf_counter()
        self._prepared.extend(self._agree(lambda: [self._next_loaded()
                                                   for _ in range(num_batches)]))
        self.prepare_wait_s += time.perf_counter() - start

    def epoch(self) -> list[PackedImageBatch]:
        """The batches of the rest of the current epoch (every sample of this rank's share once;
        evaluation uses it on a fresh loader). A collective under pipeline parallelism."""
        def rest_of_epoch():
            epoch, batches = self._position()["epoch"], []
            while (batch := self._next_loaded(epoch)) is not None:
                batches.append(batch)
            return batches

        return self._agree(rest_of_epoch)

    # --- packs in flight ----------------------------------------------------------------------

    def _draw(self, samples: list[int], sampler_state: dict) -> _PackInFlight:
        """A freshly drawn pack, its loading started (in the workers / DALI)."""
        settings = self._settings()
        return _PackInFlight(self.sampler.stats.num_packs, samples, sampler_state, settings,
                             self._start_loading(samples, settings))

    def _settings(self) -> DecodeSettings:
        return DecodeSettings(self.policy, self.norm, self.use_draft, self.decode_pixels)

    def _start_loading(self, samples: list[int], settings: DecodeSettings
                       ) -> Future | DaliPack | None:
        if self._dali is not None:
            return self._dali.submit([self._read_or_error(s) for s in samples], settings)
        if self._pool is None:
            return None
        return self._pool.submit([self.reader.locate(s) for s in samples], settings)

    def _read_or_error(self, sample: int
                       ) -> tuple[bytes, dict, tuple[int, int]] | BadSampleError:
        """What DALI gets: image bytes, meta and the indexed original (height, width)."""
        try:
            image_bytes, meta = self.reader.read(sample)
        except BadSampleError as err:
            return err
        return image_bytes, meta, (int(self.index.height[sample]), int(self.index.width[sample]))

    def _loaded(self, samples: list[int], settings: DecodeSettings,
                future: Future | DaliPack | None) -> list[LoadedSample]:
        if future is not None:
            return future.result()
        return load_samples(self.reader.read, samples, settings)

    def _consumed_packs(self) -> int:
        return self._in_flight[0].number - 1 if self._in_flight else self.sampler.stats.num_packs

    # --- pipeline agreement -------------------------------------------------------------------

    def _agree(self, decide) -> list[PackedImageBatch]:
        """``decide()``'s batches on the first pipeline stage, the same packs built on the
        others."""
        if self.pipeline is None:
            return decide()
        if self.pipeline.is_leader:
            try:
                batches = decide()
            except Exception:  # let the other stages fail too instead of waiting in broadcast
                broadcast_decision(Decision((), self._consumed_packs(), aborted=True),
                                   self.pipeline)
                raise
            broadcast_decision(Decision(tuple(b.choice for b in batches),
                                        self._consumed_packs()), self.pipeline)
            return batches
        decision = broadcast_decision(None, self.pipeline)
        if decision.aborted:
            raise RuntimeError(f"{self.index.shard_dir}: the first pipeline stage failed while "
                               "loading micro-batches (its log says why)")
        for choice in decision.choices:
            pack, kept = self._draw_until(choice.pack_number), set(choice.samples)
            if [s for s in pack if s in kept] != list(choice.samples):
                raise RuntimeError(f"pack {choice.pack_number} differs between pipeline stages "
                                   "(different data or loader settings)")
        self._draw_until(decision.end_pack_number)  # all-bad packs after the last choice
        settings = self._settings()
        futures = [self._start_loading(list(c.samples), settings) for c in decision.choices]
        return [self._follow(choice, settings, future)
                for choice, future in zip(decision.choices, futures)]

    def _draw_until(self, pack_number: int) -> list[int] | None:
        """Advance the sampler to ``pack_number`` packs drawn (as the first stage did); the last
        pack drawn."""
        pack = None
        while self.sampler.stats.num_packs < pack_number:
            pack = next(iter(self.sampler))
        if self.sampler.stats.num_packs != pack_number:
            raise RuntimeError(f"this pipeline stage's sampler is past pack {pack_number} "
                               f"({self.sampler.stats.num_packs}): the stages' loader states "
                               "differ")
        return pack

    # --- batches ------------------------------------------------------------------------------

    def _grid(self, sample: int, image: torch.Tensor | None) -> tuple[int, int]:
        """Patch grid of a decoded image, or from the index without pixels."""
        patch = self.policy.patch_size
        if image is not None:
            return image.shape[1] // patch, image.shape[2] // patch
        h, w = self.policy.target_size(int(self.index.height[sample]),
                                       int(self.index.width[sample]))
        return h // patch, w // patch

    def _load(self, pack: _PackInFlight) -> PackedImageBatch | None:
        """The batch of a pack in flight; bad samples are skipped and counted (here, in pack
        order, whichever process read them)."""
        samples, grids, images, metas = [], [], [], []
        for sample, loaded in zip(pack.samples, self._loaded(pack.samples, pack.settings,
                                                             pack.future)):
            if loaded.bad_reason:
                self.counter.skip(loaded.bad_reason, detail=loaded.bad_detail,
                                  shard=self.index.shards[int(self.index.shard_id[sample])],
                                  member=str(self.index.key[sample]))
                continue
            self.counter.ok()
            image = None if loaded.pixels is None else torch.from_numpy(loaded.pixels)
            samples.append(sample)
            grids.append(self._grid(sample, image))
            metas.append(loaded.meta)
            if image is not None:
                images.append(image)
        if not samples:
            return None
        return self._assemble(pack.number, samples, grids, images, metas)

    def _follow(self, choice: PackChoice, settings: DecodeSettings,
                future: Future | DaliPack | None) -> PackedImageBatch:
        """The batch the first pipeline stage made of a pack, rebuilt here (decoding too when
        this stage needs pixels); a kept sample that fails here means the decoders disagree."""
        images, metas = [], []
        for sample, grid, loaded in zip(choice.samples, choice.grids,
                                        self._loaded(list(choice.samples), settings, future)):
            image = None if loaded.pixels is None else torch.from_numpy(loaded.pixels)
            problem = loaded.bad_detail
            if image is not None and self._grid(sample, image) != grid:
                problem = (f"grid_mismatch: decoded grid {self._grid(sample, image)}, first "
                           f"stage {grid}")
            if problem:
                raise RuntimeError(f"sample {self.index.key[sample]} that the first pipeline "
                                   f"stage kept fails on this stage ({problem}): the stages' "
                                   "decoders disagree")
            metas.append(loaded.meta)
            if image is not None:
                images.append(image)
        self.counter.ok(len(metas))
        return self._assemble(choice.pack_number, list(choice.samples), list(choice.grids),
                              images, metas)

    def _assemble(self, pack_number: int, samples: list[int], grids: list[tuple[int, int]],
                  images: list[torch.Tensor], metas: list[dict]) -> PackedImageBatch:
        if self.decode_pixels:
            packed = pack_images(images, pad_to=self.pack_tokens)
        else:
            patch = self.policy.patch_size
            packed = _layout_only(grids, self.pack_tokens, 3 * patch * patch)
        mask = None
        if self.mask_ratio is not None:
            generator = torch.Generator().manual_seed(
                int(np.random.SeedSequence([self.seed, self.dp_rank, self.phase, pack_number])
                    .generate_state(1)[0]))
            mask = random_patch_mask(packed.image_lengths, self.mask_ratio, generator=generator)
        return PackedImageBatch(packed, images if self.decode_pixels else None,
                                [m.get("caption", "") for m in metas],
                                [str(self.index.key[s]) for s in samples], metas, mask,
                                samples, pack_number)

    # --- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        if self._prepared:
            raise RuntimeError("loader state asked between prepare() and the use of its "
                               "micro-batches: save at a step boundary")
        return {"version": _STATE_VERSION, "phase": self.phase, "sampler": self._position()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported loader state version {state.get('version')}")
        self._drop_in_flight()
        if state["phase"] != self.phase:
            self._enter_phase(int(state["phase"]))
        self.sampler.load_state_dict(state["sampler"])


def _layout_only(grids: list[tuple[int, int]], pack_tokens: int, patch_dim: int) -> PackedImages:
    """The pack's layout with zero patch rows ``[pack_tokens, patch_dim]`` (ranks that never
    read pixels)."""
    lengths = [h * w for h, w in grids]
    segments = lengths + ([pack_tokens - sum(lengths)] if sum(lengths) < pack_tokens else [])
    cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(segments).cumsum(0)
    return PackedImages(torch.zeros(pack_tokens, patch_dim), cu,
                        torch.tensor(grids, dtype=torch.long).reshape(-1, 2))
