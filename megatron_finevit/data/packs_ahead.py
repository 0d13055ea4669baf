"""Packs drawn ahead of the consumer: what the two packed loaders (``data.loader``'s images,
``data.tasks.pack_loader``'s multimodal samples) share about decoding while the trainer computes.

The sampler runs ahead of the consumer by up to ``_lookahead`` packs, each loading (DALI, PIL
decode workers) from the moment it is drawn. Every pack in flight keeps the sampler state from
before it was drawn, so the consumer's position is the oldest one's: ``state_dict`` saves it, and
dropping the packs in flight (a resume, a phase switch, ``close``) rewinds the sampler there.
Resume is then exact whatever the decoder and however many packs were in flight.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

from megatron_finevit.platform.forkserver import start_method


class PackInFlight(Protocol):
    """A pack drawn from the sampler, not yet consumed."""

    sampler_state: dict  # the sampler before it was drawn: the consumer's position

    @property
    def epoch(self) -> int: ...

    def cancel(self) -> None:
        """Stop its loading where that is still possible (else its result is dropped)."""


class PacksAhead:
    """Base of a loader that draws packs ahead of its consumer.

    The subclass sets ``sampler`` (a ``PackedBatchSampler``), ``reader`` (``close()``), ``_pool``
    and ``_dali`` (decode workers / DALI decoder, or None), ``use_draft``, ``_lookahead`` (packs kept in flight;
    0: a pack is loaded when it is asked for) and ``_in_flight = deque()``, and implements
    ``_draw(samples, sampler_state)`` (start loading a freshly drawn pack: its ``PackInFlight``)
    and ``_load(pack)`` (the consumed pack's batch; None when no sample of it is usable).
    """

    sampler: Any
    _in_flight: deque
    _lookahead: int

    def __iter__(self):
        return self

    def close(self) -> None:
        """Stop the DALI pipeline / decode workers (packs in flight are dropped; the position is
        kept, and a later ``next()`` starts them again)."""
        self._drop_in_flight()
        if self._pool is not None:
            self._pool.close()
        if self._dali is not None:
            self._dali.close()
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _decode_where(self) -> str:
        """Where the images decode, for the loader's first log line."""
        if self._dali is not None:
            return (f"DALI ({self._dali.device}, {self._dali.num_threads} threads), "
                    f"{self._lookahead} packs ahead"
                    + (" (use_draft is PIL's: ignored)" if self.use_draft else ""))
        if self._pool is not None:
            return (f"PIL in {self._pool.num_workers} worker processes ({start_method()}), up to "
                    f"{self._lookahead} packs ahead")
        return "PIL in the training process"

    def _next_loaded(self, epoch: int | None = None):
        """The next batch (packs with no usable sample skipped); with ``epoch``: None once that
        epoch's packs are used up."""
        while True:
            self._draw_ahead(max(self._lookahead, 1), epoch)
            if not self._in_flight or (epoch is not None and self._in_flight[0].epoch != epoch):
                return None
            pack = self._in_flight.popleft()
            self._draw_ahead(self._lookahead, epoch)  # the next packs load while this one is used
            batch = self._load(pack)
            if batch is not None:
                return batch

    def _draw_ahead(self, count: int, epoch: int | None) -> None:
        """Draw packs (and start loading them) until ``count`` are in flight, within ``epoch``
        if given."""
        while len(self._in_flight) < count and (epoch is None or self.sampler.epoch == epoch):
            state = self.sampler.state_dict()
            self._in_flight.append(self._draw(next(iter(self.sampler)), state))

    def _position(self) -> dict:
        """The sampler state at the consumer: from before the oldest pack in flight."""
        return self._in_flight[0].sampler_state if self._in_flight else self.sampler.state_dict()

    def _drop_in_flight(self) -> None:
        """Forget the packs in flight and rewind the sampler to the consumer's position."""
        if self._in_flight:
            self.sampler.load_state_dict(self._in_flight[0].sampler_state)
        for pack in self._in_flight:
            pack.cancel()  # a worker already on it finishes; DALI's output is dropped in turn
        self._in_flight.clear()

    def _draw(self, samples: list[int], sampler_state: dict) -> PackInFlight:
        raise NotImplementedError

    def _load(self, pack: PackInFlight):
        raise NotImplementedError
