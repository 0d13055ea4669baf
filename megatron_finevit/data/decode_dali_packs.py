"""DALI decode of the packs the loader's sampler chose (the training path's decoder).

    main process: pack decision ─ pread bytes + JSON ─ smart_resize of the indexed size
        ▼
    DALI:  fn.external_source(encoded bytes) ─ fn.decoders.image ("mixed" on GPU / "cpu")
           ─ fn.resize(size=external_source(exact [H, W])) ─ fn.crop_mirror_normalize(mean, std)
           (and fn.peek_image_shape of the bytes: the size the image really has)
        ▼
    float32 [3, H, W] numpy per sample, in pack order (patchify and packing stay the loader's)

Prefetch. ``submit`` feeds a pack's samples and schedules its run at once; DALI's asynchronous
executor queues the runs and decodes them on its own threads while the trainer computes, and
``DaliPack.result()`` collects the outputs in the order the packs were submitted (the loader
consumes them in that order; a dropped pack's outputs are collected and discarded). The loader
draws ``PACKS_AHEAD`` packs ahead and keeps each one's sampler state, so resume is exact as with
PIL decode workers. The pipeline's ``prefetch_queue_depth`` stays 1: a deeper queue makes the
first ``schedule_run`` start that many iterations at once, before the later packs' inputs exist
(DALI then fails: no data to peek).

Failures. The header checks of the PIL path (format, pixel cap, PNG CRCs) already passed at
index build for every indexed sample (``build_index`` runs ``open_image``; an index older than
its shards is refused), so they are not repeated here: a read error (cut-off tar, bad JSON) is
counted now, and the rest goes to DALI with the target size of the indexed original size. An
image DALI cannot decode (a truncated JPEG body, anything the index did not see) makes DALI fail
the whole batch and leaves the pipeline unusable: that pack is decoded again one sample at a time
by the reference decoder (``decode_pil``), which gives the skip set and reasons of the PIL path
and PIL pixels for the rest of that pack (within the decoder bound of the DALI ones); the
pipeline is rebuilt and the packs scheduled after it are resubmitted.

Target sizes come from ``smart_resize`` (integers), never from DALI float arithmetic. They are
computed from the size the caller gives (the index's, or a conversation's JSON), while PIL sizes
an image from its own header: an image whose header size (``fn.peek_image_shape``, EXIF-oriented
as the decode is) resizes to another size than the one asked — its index or JSON disagrees with
it — is decoded again by PIL, so the caller sees the size the reference decoder gives and its own
check decides (never a silently stretched image). This never fires on consistent data.
``device="mixed"`` (nvJPEG) is not exercised in CI (no GPU there); its outputs are copied to host.
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np
import torch

from megatron_finevit.data.bad_samples import BadSampleError
from megatron_finevit.data.decode_pil import Normalization
from megatron_finevit.data.decode_workers import DecodeSettings, LoadedSample, load_samples
from megatron_finevit.data.resize import ResizePolicy

log = logging.getLogger(__name__)

PACKS_AHEAD = 2   # packs decoding while the current one is consumed
DECODERS = ("auto", "dali", "pil")


def resolve_decoder(name: str) -> tuple[str, str]:
    """``"auto" | "dali" | "pil"`` → (the decoder to use, why). ``auto``: DALI where it
    imports, else PIL. ValueError on an unknown name or an explicit ``dali`` without DALI."""
    if name not in DECODERS:
        raise ValueError(f"decoder={name!r} must be one of {', '.join(DECODERS)}")
    if name == "pil":
        return "pil", "asked for"
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as err:
        if name == "dali":
            raise ValueError(f"decoder='dali' but nvidia.dali does not import ({err}); install "
                             "nvidia-dali or use decoder: pil / auto") from None
        return "pil", f"auto: nvidia.dali does not import ({err})"
    return "dali", "asked for" if name == "dali" else "auto: nvidia.dali imports"


def decoder_problems(decoder, num_workers, prefix: str = "stage_config.data.") -> list[str]:
    """Config problems of a ``decoder`` name and a ``num_workers`` count (every stage's data
    section words them alike)."""
    problems = []
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        problems.append(f"{prefix}num_workers={num_workers!r} must be an integer >= 0 (0: "
                        "decode in the training process)")
    if decoder not in DECODERS:
        problems.append(f"{prefix}decoder={decoder!r} must be one of {', '.join(DECODERS)}")
    return problems


class DaliPack:
    """A pack submitted to DALI: ``result()`` -> one ``LoadedSample`` per sample (a future)."""

    def __init__(self, decoder: DaliPackDecoder, loaded: list[LoadedSample],
                 todo: list[tuple[int, bytes, tuple[int, int]]], settings: DecodeSettings):
        self.decoder, self.loaded, self.todo, self.settings = decoder, loaded, todo, settings
        self.done = not todo

    def result(self) -> list[LoadedSample]:
        while not self.done:
            self.decoder._collect_oldest()
        return self.loaded

    def cancel(self) -> bool:
        return False  # already scheduled: its outputs are collected and dropped in turn


class DaliPackDecoder:
    """One DALI pipeline decoding whole packs (batches of up to ``max_batch`` samples).

    Args:
        max_batch: the most samples a pack can hold (DALI's batch size).
        num_threads: DALI's CPU threads.
        device: "cpu" or "mixed" (GPU decode; default: "mixed" iff CUDA is available).
    """

    def __init__(self, max_batch: int, num_threads: int = 2, device: str | None = None,
                 norm: Normalization = Normalization()):
        self.max_batch, self.num_threads, self.norm = max(1, max_batch), num_threads, norm
        self.device = device or ("mixed" if torch.cuda.is_available() else "cpu")
        if self.device not in ("cpu", "mixed"):
            raise ValueError(f"device must be 'cpu' or 'mixed', got {self.device!r}")
        self._pipe = None
        self._pending: deque[DaliPack] = deque()  # scheduled, outputs not collected, in order
        self.fallbacks = 0                        # packs DALI failed, decoded by PIL

    def submit(self, reads: list, settings: DecodeSettings) -> DaliPack:
        """``reads``: per sample ``(image bytes, meta, (height, width) in the index)`` or the
        ``BadSampleError`` reading it raised."""
        if settings.norm != self.norm:
            raise ValueError("the pipeline was built for another normalisation")
        loaded, todo = [], []
        for slot, read in enumerate(reads):
            try:
                if isinstance(read, BadSampleError):
                    raise read
                image_bytes, meta, (height, width) = read
                size = settings.policy.target_size(height, width)
            except BadSampleError as err:
                loaded.append(LoadedSample(bad_reason=err.reason, bad_detail=str(err)))
                continue
            loaded.append(LoadedSample(meta))
            todo.append((slot, image_bytes, size))
        pack = DaliPack(self, loaded, todo, settings)
        if todo:
            self._schedule(pack)
        return pack

    def close(self) -> None:
        self._pending.clear()
        self._pipe = None

    def _schedule(self, pack: DaliPack) -> None:
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("encoded", [np.frombuffer(b, np.uint8) for _, b, _ in pack.todo])
        self._pipe.feed_input("size", [np.asarray(s, np.float32) for _, _, s in pack.todo])
        self._pipe.schedule_run()
        self._pending.append(pack)

    def _collect_oldest(self) -> None:
        pack = self._pending.popleft()
        try:
            pixels, shapes = self._pipe.outputs()
        except RuntimeError as err:
            self._recover(pack, err)
            return
        if self.device == "mixed":
            pixels = pixels.as_cpu()
        resized_otherwise = []
        for i, item in enumerate(pack.todo):
            slot, _, size = item
            if not _sized_as_asked(pack.settings.policy, np.array(shapes[i]), size):
                resized_otherwise.append(item)
                continue
            # DALI reuses its output buffers on the next run: copy out
            pack.loaded[slot].pixels = np.array(pixels[i])
        self._decode_with_pil(pack, resized_otherwise)
        pack.done = True

    def _recover(self, pack: DaliPack, err: RuntimeError) -> None:
        """DALI failed ``pack``'s batch: decode it sample by sample with PIL; rebuild the
        pipeline and resubmit the packs scheduled after it."""
        self.fallbacks += 1
        log.warning("DALI failed a pack of %d samples (%s); decoding it one by one with PIL",
                    len(pack.todo), str(err).strip().splitlines()[-1][:200])
        self._decode_with_pil(pack, pack.todo)
        pack.done = True
        later, self._pipe = list(self._pending), None
        self._pending.clear()
        for other in later:
            self._schedule(other)

    @staticmethod
    def _decode_with_pil(pack: DaliPack, todo: list[tuple[int, bytes, tuple[int, int]]]) -> None:
        """The reference decoder's result for these samples of ``pack`` (pixels or the reason
        it skips them)."""
        items = [(b, pack.loaded[slot].meta) for slot, b, _ in todo]
        for (slot, _, _), sample in zip(todo, load_samples(lambda item: item, items,
                                                           pack.settings)):
            pack.loaded[slot] = sample

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        device_id = torch.cuda.current_device() if self.device == "mixed" else None

        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads,
                      device_id=device_id, prefetch_queue_depth=1, exec_async=True,
                      exec_pipelined=True)
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            decoded = fn.decoders.image(encoded, device=self.device, output_type=types.RGB)
            # linear with antialias: PIL's BILINEAR filter when shrinking
            resized = fn.resize(decoded, size=size, interp_type=types.INTERP_LINEAR,
                                antialias=True)
            normalised = fn.crop_mirror_normalize(
                resized, dtype=types.FLOAT, output_layout="CHW",
                mean=[255.0 * m for m in self.norm.mean], std=[255.0 * s for s in self.norm.std])
            # [H, W, C] from the header on the CPU, whatever the decode device
            return normalised, fn.peek_image_shape(encoded)

        pipe = pipeline()
        pipe.build()
        return pipe


def _sized_as_asked(policy: ResizePolicy, shape: np.ndarray, size: tuple[int, int]) -> bool:
    """Whether an image of header ``shape`` ``[H, W, C]`` resizes to ``size`` (as PIL sizes
    it)."""
    try:
        return policy.target_size(int(shape[0]), int(shape[1])) == tuple(size)
    except BadSampleError:
        return False
