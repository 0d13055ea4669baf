"""Per-stage, resumable loader of packed image(+caption) micro-batches for one data-parallel rank.

    shard dir + index.zarr ─ sizes under the current ResizePolicy ─ PackedBatchSampler (fixed pack)
      ─ random-access reads of the pack's samples (tar offsets) ─ PIL decode + smart_resize
      ─ PackedImages padded to ``pack_tokens`` (+ captions, keys, Stage I MIM masks)

Sizes. Every sample's token cost is recomputed from its original ``height``/``width`` in the
index under the policy of the current *phase*, so a resolution schedule (Stage II: max 336² →
448²) changes ``max_pixels`` at a step boundary without re-indexing. ``smart_resize`` is evaluated
once per distinct original size (real data sets repeat sizes a lot). Samples the policy rejects
(aspect ratio) get a size above the pack and the sampler skips and counts them.

Random access. ``build_index`` writes, next to ``index.zarr``, DALI index files listing each
usable sample's tar members as ``ext offset size name`` in index row order; the loader reads a
sample with two ``pread``s from those offsets (no tar scan, nothing extracted).

Phases and resume. ``phases`` is a list of ``(start_step, ResizePolicy)``; ``set_step(step)``
(called by the stage before each step) switches phase when ``step`` crosses a start. Each phase has
its own sampler (sizes differ), seeded by (seed, phase), starting at its first epoch. ``state_dict``
holds the phase and its sampler's state (plain ints and lists), so a resumed run yields exactly the
packs the uninterrupted one would have. MIM masks are drawn from a generator seeded by (seed,
dp_rank, phase, pack number), so they need no state of their own.

Pipeline parallelism: ranks that need no pixels (middle pipeline stages) pass
``decode_pixels=False``; they get the same pack layout with zero patches.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_finevit.data.bad_samples import BadSampleCounter, BadSampleError
from megatron_finevit.data.decode_pil import Normalization, decode_pil
from megatron_finevit.data.index import SampleIndex, dali_index_path, load_index
from megatron_finevit.data.masking import random_patch_mask
from megatron_finevit.data.packing import PackedBatchSampler
from megatron_finevit.data.resize import ResizePolicy
from megatron_finevit.data.shards import IMAGE_EXTS, validate_meta
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
    """

    packed: PackedImages
    images: list[torch.Tensor] | None
    captions: list[str]
    keys: list[str]
    metas: list[dict]
    mim_mask: torch.Tensor | None

    @property
    def num_images(self) -> int:
        return self.packed.num_images

    @property
    def image_tokens(self) -> list[int]:
        return self.packed.image_lengths


def policy_sizes(index: SampleIndex, policy: ResizePolicy, reject_size: int) -> np.ndarray:
    """Patch tokens ``[n]`` int64 of every indexed sample under ``policy`` (``reject_size`` for
    samples the policy refuses)."""
    pairs = np.stack([index.height, index.width], axis=1).astype(np.int64)
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    tokens = np.empty(len(unique), dtype=np.int64)
    for i, (h, w) in enumerate(unique.tolist()):
        try:
            tokens[i] = policy.num_patches(h, w)
        except BadSampleError:
            tokens[i] = reject_size
    return tokens[inverse.reshape(-1)]


class SampleReader:
    """Random access to indexed samples: ``read(i) -> (image bytes, meta)`` via tar offsets."""

    def __init__(self, index: SampleIndex):
        self.index = index
        self._members: list[list[tuple[int, int, int, int]]] = []  # per shard, per row
        for name in index.shards:
            self._members.append(_read_member_table(dali_index_path(index.shard_dir, name)))
        starts = np.zeros(len(index.shards) + 1, dtype=np.int64)
        np.add.at(starts, index.shard_id.astype(np.int64) + 1, 1)
        self._row_start = np.cumsum(starts)
        self._files: dict[int, int] = {}
        for shard, members in enumerate(self._members):
            expected = int(self._row_start[shard + 1] - self._row_start[shard])
            if len(members) != expected:
                raise RuntimeError(f"{dali_index_path(index.shard_dir, index.shards[shard])} "
                                   f"lists {len(members)} samples, index.zarr {expected}: rebuild "
                                   "the index (tools/build_index.py)")

    def read(self, sample: int) -> tuple[bytes, dict]:
        shard = int(self.index.shard_id[sample])
        row = sample - int(self._row_start[shard])
        image_offset, image_size, json_offset, json_size = self._members[shard][row]
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files[shard] = os.open(self.index.shard_path(sample), os.O_RDONLY)
        image = os.pread(fd, image_size, image_offset)
        text = os.pread(fd, json_size, json_offset)
        if len(image) != image_size or len(text) != json_size:
            raise BadSampleError("truncated_tar", f"sample {self.index.key[sample]} is cut off")
        try:
            meta = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadSampleError("invalid_json", str(err)) from None
        return image, validate_meta(meta)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __del__(self):
        self.close()


def _read_member_table(path: Path) -> list[tuple[int, int, int, int]]:
    """``(image offset, image size, json offset, json size)`` per line of a DALI index file."""
    lines = path.read_text().splitlines()
    table = []
    for line in lines[1:]:
        fields = line.split()
        members = {fields[i]: (int(fields[i + 1]), int(fields[i + 2]))
                   for i in range(0, len(fields), 4)}
        image_ext = next(ext for ext in members if ext in IMAGE_EXTS)
        table.append((*members[image_ext], *members["json"]))
    return table


class PackedImageLoader:
    """Infinite, resumable iterator of ``PackedImageBatch`` for one data-parallel rank.

    Args:
        shard_dir: shards + ``index.zarr`` + ``dali_index/`` (``tools/build_index.py``).
        phases: ``[(start_step, ResizePolicy)]``, first start 0, increasing.
        pack_tokens: fixed tokens per pack (pipeline shapes stay fixed; must hold the largest
            image of every phase).
        dp_rank, dp_size: this rank's disjoint share (``PackedBatchSampler``).
        mask_ratio: draw a Stage I mask per image (None: no masks).
        decode_pixels: False on ranks that only need the layout (middle pipeline stages).
        use_draft: let libjpeg decode at a reduced scale when the target is much smaller
            (faster, slightly different pixels; ``decode_pil``).
        decoder: "pil" (reference, CPU). The DALI reader is sequential and cannot serve
            random-access packs; it is refused with an explanation.
    """

    def __init__(self, shard_dir, phases: list[tuple[int, ResizePolicy]], pack_tokens: int, *,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, buffer_size: int = 512,
                 min_fill: float = 0.9, mask_ratio: float | None = None,
                 decode_pixels: bool = True, decoder: str = "pil", use_draft: bool = False,
                 norm: Normalization = Normalization(), counter: BadSampleCounter | None = None):
        if decoder != "pil":
            raise ValueError(f"decoder={decoder!r}: the packing loader reads samples by random "
                             "access and decodes them with PIL; DALI's webdataset reader is "
                             "sequential (use it through data.decode_dali for streaming jobs)")
        starts = [start for start, _ in phases]
        if not phases or starts[0] != 0 or starts != sorted(set(starts)):
            raise ValueError(f"phases must start at step 0 with increasing steps, got {starts}")
        self.index = load_index(shard_dir)
        self.reader = SampleReader(self.index)
        self.phases, self.pack_tokens = list(phases), int(pack_tokens)
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.buffer_size, self.min_fill, self.mask_ratio = buffer_size, min_fill, mask_ratio
        self.decode_pixels, self.norm, self.use_draft = decode_pixels, norm, use_draft
        self.counter = counter if counter is not None else BadSampleCounter(name=str(shard_dir))
        self.phase = -1
        self.sampler: PackedBatchSampler | None = None
        self._enter_phase(0)

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
        self.phase = phase
        sizes = policy_sizes(self.index, self.policy, self.pack_tokens + 1)
        self.sampler = PackedBatchSampler(
            sizes, self.pack_tokens, buffer_size=self.buffer_size, seed=self.seed * 1000 + phase,
            dp_rank=self.dp_rank, dp_size=self.dp_size, min_fill=self.min_fill)
        self._sizes = sizes

    # --- iteration ----------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> PackedImageBatch:
        while True:
            pack = next(iter(self.sampler))
            batch = self._load(pack, self.sampler.stats.num_packs)
            if batch is not None:
                return batch

    def epoch(self):
        """The batches of the rest of the current epoch (every sample of this rank's share once;
        evaluation uses it on a fresh loader)."""
        for pack in self.sampler:
            batch = self._load(pack, self.sampler.stats.num_packs)
            if batch is not None:
                yield batch

    def _load(self, pack: list[int], pack_number: int) -> PackedImageBatch | None:
        images, captions, keys, grids, metas = [], [], [], [], []
        patch = self.policy.patch_size
        for sample in pack:
            key = str(self.index.key[sample])
            try:
                image_bytes, meta = self.reader.read(sample)
                if self.decode_pixels:
                    image = decode_pil(image_bytes, self.policy, self.norm,
                                       use_draft=self.use_draft)
                    grids.append((image.shape[1] // patch, image.shape[2] // patch))
                    images.append(image)
                else:
                    h, w = self.policy.target_size(int(self.index.height[sample]),
                                                   int(self.index.width[sample]))
                    grids.append((h // patch, w // patch))
            except BadSampleError as err:
                self.counter.skip_error(err, shard=self.index.shards[int(self.index.shard_id[sample])],
                                        member=key)
                continue
            self.counter.ok()
            captions.append(meta.get("caption", ""))
            keys.append(key)
            metas.append(meta)
        if not keys:
            return None
        if self.decode_pixels:
            packed = pack_images(images, pad_to=self.pack_tokens)
        else:
            packed = _layout_only(grids, self.pack_tokens, 3 * patch * patch)
        mask = None
        if self.mask_ratio is not None:
            generator = torch.Generator().manual_seed(
                int(np.random.SeedSequence([self.seed, self.dp_rank, self.phase, pack_number])
                    .generate_state(1)[0]))
            mask = random_patch_mask(packed.image_lengths, self.mask_ratio, generator=generator)
        return PackedImageBatch(packed, images if self.decode_pixels else None, captions, keys,
                                metas, mask)

    # --- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"version": _STATE_VERSION, "phase": self.phase,
                "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported loader state version {state.get('version')}")
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
