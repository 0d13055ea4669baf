"""Pack variable-length samples into fixed token budgets: first-fit-decreasing, shuffle buffer.

Every micro-batch is one *pack*: a fixed number of tokens (`token_budget`) holding several
samples back to back, the unused tail padded. Fixed shapes keep pipeline-parallel p2p simple, and
packing wastes far less compute than padding every image of a batch to the largest one
(`tools/bench_packing.py` measures both).

The same algorithm packs every kind of sample; only the sizes differ:

* images for the ViT — size = patch tokens after `smart_resize` (`ResizePolicy.num_patches`);
* images with their LLM sequence (Stage III / SFT) — sizes `[n, 2]` = (ViT patches, LLM tokens)
  against two budgets; a pack must respect both;
* text only — size = token count.

Algorithm (`PackedBatchSampler`), per epoch and data-parallel rank:

1. the samples that fit the budget are shuffled with a generator seeded by (seed, epoch), and
   rank r takes every `dp_size`-th of them (disjoint shards, sizes within one of each other);
2. a shuffle buffer of `buffer_size` samples is filled from the shard;
3. the buffer is packed with first-fit-decreasing (`first_fit_decreasing`); packs filled to at
   least `min_fill` are emitted in a seeded random order, the samples of the other packs go back
   to the buffer to be combined with fresh samples in the next round (at the end of the shard
   everything is emitted);
4. repeat until the shard is used up, then the epoch number advances.

Samples larger than the budget can never be packed: they are skipped and counted
(`num_oversize`, logged at construction), or raise with `oversize="error"`.

Resume is exact: `state_dict()` holds the epoch, the position in the shard, the buffer contents
and the packs formed but not yet handed out, as plain ints and lists (no pickle needed). A sampler
that loads it yields exactly the packs the uninterrupted one would have yielded next. The state is
tied to (sizes, budget, buffer, seed, dp_rank, dp_size); changing any of them on resume is refused.

Padding convention (`pack_layout`): the padding tail is its own segment in `cu_seqlens`, so
attention never mixes padding into a real sample, and optional zero-length segments give
`cu_seqlens` a fixed shape.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterator, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

_STATE_VERSION = 1


def _as_sizes_and_budget(sizes, token_budget) -> tuple[np.ndarray, np.ndarray]:
    """Normalise to sizes `[n, d]` int64 and budget `[d]` int64, validating both."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.ndim == 1:
        sizes = sizes[:, None]
    budget = np.atleast_1d(np.asarray(token_budget, dtype=np.int64))
    if sizes.ndim != 2 or budget.ndim != 1 or sizes.shape[1] != budget.shape[0]:
        raise ValueError(f"sizes of shape {sizes.shape} do not match token_budget "
                         f"{budget.tolist()}: give sizes [n] with one budget or [n, d] with "
                         "d budgets")
    if (budget <= 0).any():
        raise ValueError(f"token_budget must be positive, got {budget.tolist()}")
    if sizes.size and (sizes <= 0).any():
        bad = int(np.flatnonzero((sizes <= 0).any(axis=1))[0])
        raise ValueError(f"sample {bad} has a non-positive size {sizes[bad].tolist()}")
    return sizes, budget


def first_fit_decreasing(sizes, token_budget) -> list[np.ndarray]:
    """Pack items into as few bins as first-fit-decreasing finds.

    Args:
        sizes: `[n]` or `[n, d]` positive ints, each row fitting `token_budget`.
        token_budget: int, or `[d]` ints (a bin must respect every dimension).

    Returns:
        One int64 array per bin, in creation order, holding positions into `sizes` (largest item
        first). Items are sorted by their largest fraction of the budget (descending; ties keep
        input order) and each goes to the first bin it fits, so the result is deterministic.
    """
    sizes, budget = _as_sizes_and_budget(sizes, token_budget)
    if (sizes > budget).any():
        raise ValueError("an item exceeds the token budget; filter oversize items first")
    order = np.argsort(-(sizes / budget).max(axis=1), kind="stable")
    remaining = np.empty((len(sizes), len(budget)), dtype=np.int64)  # at most one bin per item
    members: list[list[int]] = []
    for item in order.tolist():
        size = sizes[item]
        fits = np.flatnonzero((remaining[: len(members)] >= size).all(axis=1))
        if fits.size:
            bin_id = int(fits[0])
        else:
            bin_id = len(members)
            remaining[bin_id] = budget
            members.append([])
        remaining[bin_id] -= size
        members[bin_id].append(item)
    return [np.asarray(m, dtype=np.int64) for m in members]


@dataclasses.dataclass
class PackingStats:
    """Running totals of what a sampler has emitted.

    `real_tokens[k]` counts sample tokens in budget dimension k; efficiency = real tokens /
    computed tokens (packs × budget). Dimension 0 is the primary one (ViT patches, or text tokens).
    """

    token_budget: tuple[int, ...]
    num_packs: int = 0
    num_samples: int = 0
    real_tokens: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.token_budget = tuple(int(b) for b in self.token_budget)
        if not self.real_tokens:
            self.real_tokens = [0] * len(self.token_budget)

    def add(self, pack_sizes: np.ndarray) -> None:
        """Account for one emitted pack whose samples have sizes `[k, d]`."""
        self.num_packs += 1
        self.num_samples += len(pack_sizes)
        for dim, tokens in enumerate(pack_sizes.sum(axis=0).tolist()):
            self.real_tokens[dim] += int(tokens)

    @property
    def efficiency_per_budget(self) -> tuple[float, ...]:
        if not self.num_packs:
            return tuple(0.0 for _ in self.token_budget)
        return tuple(r / (self.num_packs * b) for r, b in zip(self.real_tokens, self.token_budget))

    @property
    def efficiency(self) -> float:
        """Real / computed tokens of the primary budget (dimension 0)."""
        return self.efficiency_per_budget[0]

    @property
    def samples_per_pack(self) -> float:
        return self.num_samples / self.num_packs if self.num_packs else 0.0

    def state_dict(self) -> dict:
        return {"num_packs": self.num_packs, "num_samples": self.num_samples,
                "real_tokens": list(self.real_tokens)}

    def load_state_dict(self, state: dict) -> None:
        self.num_packs = int(state["num_packs"])
        self.num_samples = int(state["num_samples"])
        self.real_tokens = [int(t) for t in state["real_tokens"]]


class PackedBatchSampler:
    """Deterministic, resumable stream of packs (lists of sample indices) for one DP rank.

    Iterating yields the packs of the rest of the current epoch, then the epoch number advances
    (the next `iter()` starts the next, reshuffled epoch), like a torch sampler with `set_epoch`.
    Tensor-parallel (and context-parallel) ranks of one data-parallel rank build the sampler with
    the same `dp_rank` and so get identical packs.

    Args:
        sizes: `[n]` or `[n, d]` positive token counts per sample (e.g. from the zarr index).
        token_budget: tokens per pack, an int or `d` ints.
        buffer_size: samples considered together by first-fit-decreasing; larger packs tighter
            and shuffles more, at O(buffer_size × packs in buffer) work per round.
        seed: base seed; packs are a pure function of (seed, epoch, dp_rank, dp_size, config).
        dp_rank, dp_size: this rank's shard of every epoch (disjoint across ranks).
        min_fill: packs of a round filled below this fraction (largest over budget dimensions)
            return their samples to the buffer instead of being emitted, except at the end of
            the shard.
        oversize: "skip" (count and leave out samples that exceed the budget) or "error".
    """

    def __init__(self, sizes, token_budget, *, buffer_size: int = 2048, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, min_fill: float = 0.95,
                 oversize: str = "skip"):
        self.sizes, self.token_budget = _as_sizes_and_budget(sizes, token_budget)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, dp_size={dp_size})")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if not 0.0 <= min_fill <= 1.0:
            raise ValueError(f"min_fill must be in [0, 1], got {min_fill}")
        if oversize not in ("skip", "error"):
            raise ValueError(f"oversize must be 'skip' or 'error', got {oversize!r}")
        self.buffer_size, self.seed, self.min_fill = int(buffer_size), int(seed), float(min_fill)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)

        fits = (self.sizes <= self.token_budget).all(axis=1)
        self.num_oversize = int((~fits).sum())
        if self.num_oversize:
            first = int(np.flatnonzero(~fits)[0])
            message = (f"{self.num_oversize} of {len(self.sizes)} samples exceed the token budget "
                       f"{self.token_budget.tolist()} (first: sample {first} with "
                       f"{self.sizes[first].tolist()} tokens)")
            if oversize == "error":
                raise ValueError(message)
            logger.warning("%s; they are skipped", message)
        self._eligible = np.flatnonzero(fits)
        if len(self._eligible) < self.dp_size:
            raise ValueError(f"only {len(self._eligible)} packable samples for dp_size "
                             f"{self.dp_size}: every rank needs at least one")

        self.stats = PackingStats(tuple(self.token_budget.tolist()))
        self.epoch = 0
        self._cursor = 0  # samples of this epoch's shard moved into the buffer so far
        self._round = 0  # first-fit-decreasing rounds run this epoch (seeds the pack order)
        self._buffer: list[int] = []
        self._ready: list[list[int]] = []  # packs formed, not yet handed out
        self._shard_epoch: int | None = None
        self._shard = np.empty(0, dtype=np.int64)

    # ---- per-epoch data ------------------------------------------------------------------
    def _rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, *stream]))

    def shard(self, epoch: int) -> np.ndarray:
        """Sample indices this rank draws from in `epoch`, in draw order."""
        if self._shard_epoch != epoch:
            order = self._rng(epoch).permutation(self._eligible)
            self._shard, self._shard_epoch = order[self.dp_rank :: self.dp_size], epoch
        return self._shard

    # ---- packing ---------------------------------------------------------------------------
    def _pack_buffer(self) -> None:
        """One round: refill the buffer, pack it, queue the full packs, keep the rest."""
        shard = self.shard(self.epoch)
        take = min(self.buffer_size - len(self._buffer), len(shard) - self._cursor)
        self._buffer.extend(shard[self._cursor : self._cursor + take].tolist())
        self._cursor += take
        shard_done = self._cursor == len(shard)

        buffer = np.asarray(self._buffer, dtype=np.int64)
        bins = first_fit_decreasing(self.sizes[buffer], self.token_budget)
        fill = np.array([(self.sizes[buffer[b]].sum(axis=0) / self.token_budget).max()
                         for b in bins])
        emit = np.ones(len(bins), bool) if shard_done else fill >= self.min_fill
        if not emit.any():
            # The buffer cannot fill a pack to min_fill at all (buffer too small for the budget):
            # emitting everything is the only way to make progress.
            emit[:] = True
        order = self._rng(self.epoch, self.dp_rank, self._round).permutation(np.flatnonzero(emit))
        self._ready.extend(buffer[bins[i]].tolist() for i in order.tolist())
        self._buffer = [int(s) for i in np.flatnonzero(~emit).tolist() for s in buffer[bins[i]]]
        self._round += 1

    def _next_pack(self) -> list[int]:
        """The next pack of the current epoch; rolls the epoch right after its last pack."""
        if not self._ready:
            self._pack_buffer()
        pack = self._ready.pop(0)
        self.stats.add(self.sizes[pack])
        if not self._ready and not self._buffer and self._cursor == len(self.shard(self.epoch)):
            self.epoch, self._cursor, self._round = self.epoch + 1, 0, 0
        return pack

    def __iter__(self) -> Iterator[list[int]]:
        """Packs of the rest of the current epoch (state advances as each pack is yielded)."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self._next_pack()

    # ---- resume ----------------------------------------------------------------------------
    def _config(self) -> dict:
        return {"num_samples": len(self.sizes), "token_budget": self.token_budget.tolist(),
                "buffer_size": self.buffer_size, "seed": self.seed, "min_fill": self.min_fill,
                "dp_rank": self.dp_rank, "dp_size": self.dp_size}

    def state_dict(self) -> dict:
        """Position after the last yielded pack, as plain Python ints/lists."""
        return {"version": _STATE_VERSION, "config": self._config(), "epoch": self.epoch,
                "cursor": self._cursor, "round": self._round, "buffer": list(self._buffer),
                "ready": [list(p) for p in self._ready], "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported packing state version {state.get('version')}")
        mismatched = {k: (v, state["config"].get(k)) for k, v in self._config().items()
                      if state["config"].get(k) != v}
        if mismatched:
            raise ValueError("packing state was saved with a different configuration "
                             f"(now, saved): {mismatched}")
        self.epoch, self._cursor = int(state["epoch"]), int(state["cursor"])
        self._round = int(state["round"])
        self._buffer = [int(s) for s in state["buffer"]]
        self._ready = [[int(s) for s in p] for p in state["ready"]]
        self.stats.load_state_dict(state["stats"])


@dataclasses.dataclass(frozen=True)
class PackLayout:
    """Segment boundaries of one pack in THD layout.

    Attributes:
        cu_seqlens: `[num_segments + 1]` int32 cumulative offsets, starting at 0 and ending at the
            token budget; the padding tail (if any) is one extra segment after the samples,
            followed by zero-length segments when a fixed `num_segments` was asked for.
        max_seqlen: longest segment (padding included: attention computes it too).
        num_samples: segments that are real samples (the first `num_samples`).
        num_real_tokens, num_pad_tokens: tokens in samples and in the padding tail.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    num_samples: int
    num_real_tokens: int
    num_pad_tokens: int


def pack_layout(lengths: Sequence[int], token_budget: int,
                num_segments: int | None = None) -> PackLayout:
    """`cu_seqlens` for samples of `lengths` tokens laid back to back in a `token_budget` pack.

    Args:
        lengths: positive token counts of the samples, in pack order, summing to <= budget.
        token_budget: total tokens of the pack (samples + padding tail).
        num_segments: if given, `cu_seqlens` is extended with zero-length segments to exactly
            `num_segments + 1` entries, so its shape is the same for every pack.
    """
    lengths = [int(n) for n in lengths]
    if any(n <= 0 for n in lengths):
        raise ValueError(f"sample lengths must be positive, got {lengths}")
    real = sum(lengths)
    if real > token_budget:
        raise ValueError(f"samples of {real} tokens do not fit a budget of {token_budget}")
    segments = lengths + ([token_budget - real] if real < token_budget else [])
    if num_segments is not None:
        if num_segments < len(segments):
            raise ValueError(f"pack has {len(segments)} segments (padding included), more than "
                             f"num_segments={num_segments}")
        segments += [0] * (num_segments - len(segments))
    cu_seqlens = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(segments, dtype=torch.int64), 0)
    return PackLayout(cu_seqlens=cu_seqlens, max_seqlen=max(segments), num_samples=len(lengths),
                      num_real_tokens=real, num_pad_tokens=token_budget - real)
