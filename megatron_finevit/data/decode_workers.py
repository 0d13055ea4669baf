"""Reading and decoding the samples of one pack, in the training process or in worker processes.

    main process: pack decision (sampler) ─ tar offsets ─┐           ┌─ bad-sample counting, pack
                                                          ▼           │  assembly, in pack order
    worker i:     pread image + json ─ validate ─ decode_pil ─ float32 [3, H, W] (numpy)

``load_samples`` is the one function both paths run, so a worker yields the pixels and failures
the in-process path does. A worker never decides anything: it gets a pack's tar locations and
returns one ``LoadedSample`` per sample, a bad one as its reason (a ``BadSampleError`` does not
survive pickling: its ``args`` hold the formatted message, not the reason); the loader counts
and skips in the main process, in order, when it consumes the pack. The Stage III / SFT loaders
(``data.tasks.pack_loader``) read in the main process (a sample's JSON sizes its images) and send
the image bytes instead (``DecodePool.submit_images`` → ``decode_images``, the same
``load_samples``).

Start method. Workers come from a *forkserver* (spawn where there is none): the trainer has
gloo/NCCL threads and possibly CUDA by the time the loader starts, and ``fork`` copies a process
with other threads' locks held (a child can deadlock in its first malloc or OpenMP call). The
forkserver is a fresh interpreter that preloads this module (torch, PIL) once; each worker is a
cheap fork of it. As under spawn, each worker imports the entry script (Python 3.11's forkserver
does not preload it), so it needs a ``__main__`` guard and a light top level: heavy imports
(megatron) belong inside functions, as in ``megatron_finevit.train``, or every worker pays them.

Lifetime. Workers ignore SIGINT/SIGTERM/SIGUSR1: a pre-emption signal is the trainer's to act
on (finish the step, checkpoint), and a worker dying of it would break the step it must finish.
They exit when the pool is closed (the trainer closes its data at the end of training, also on
an exception), when the loader is garbage-collected, or, if the training process is killed
outright, as soon as its end of the parent pipe closes.

Results travel as numpy arrays, not tensors: importing torch registers reductions that send
tensors through shared-memory file descriptors (one per tensor, a per-process limit); a pickled
array is one copy into the pipe and nothing to leak.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import weakref
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch

from megatron_finevit.data.bad_samples import BadSampleError
from megatron_finevit.data.decode_pil import Normalization, decode_pil
from megatron_finevit.data.resize import ResizePolicy
from megatron_finevit.data.shards import validate_meta
from megatron_finevit.platform.forkserver import forkserver_context

log = logging.getLogger(__name__)

PACKS_IN_FLIGHT_PER_WORKER = 2  # one being decoded, one queued: a worker never idles between packs


class SampleLocation(NamedTuple):
    """Where one sample's image and JSON members lie in its tar shard."""

    path: str
    key: str
    image_offset: int
    image_size: int
    json_offset: int
    json_size: int


class ShardFiles:
    """Open shard files by path (kept open: a pack reads many samples of few shards)."""

    def __init__(self):
        self._fds: dict[str, int] = {}

    def read(self, location: SampleLocation) -> tuple[bytes, dict]:
        """(image bytes, validated meta) with two ``pread``s; BadSampleError if cut off or the
        JSON is invalid."""
        images, meta = self.read_members(
            location.path, location.key, [(location.image_offset, location.image_size)],
            (location.json_offset, location.json_size))
        return images[0], meta

    def read_members(self, path: str, key: str, images: list[tuple[int, int]],
                     json_member: tuple[int, int]) -> tuple[list[bytes], dict]:
        """(the bytes of each ``(offset, size)`` image member, validated meta); BadSampleError
        if cut off or the JSON is invalid."""
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        data = [os.pread(fd, size, offset) for offset, size in [*images, json_member]]
        if any(len(d) != size for d, (_, size) in zip(data, [*images, json_member])):
            raise BadSampleError("truncated_tar", f"sample {key} is cut off")
        try:
            meta = json.loads(data[-1].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadSampleError("invalid_json", str(err)) from None
        return data[:-1], validate_meta(meta)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        self.close()


@dataclass
class LoadedSample:
    """One sample of a pack as read: its meta and pixels, or why it is unusable."""

    meta: dict | None = None
    pixels: np.ndarray | None = None  # float32 [3, H, W], normalised; None without decode
    bad_reason: str = ""              # BadSampleError.reason when the sample is skipped
    bad_detail: str = ""              # str(BadSampleError), for the skip's log line


@dataclass(frozen=True)
class DecodeSettings:
    """How a pack's images are decoded (the current resolution phase's policy)."""

    policy: ResizePolicy
    norm: Normalization
    use_draft: bool
    decode_pixels: bool = True


def load_samples(read: Callable, items: list, settings: DecodeSettings) -> list[LoadedSample]:
    """``read(item) -> (image bytes, meta)`` and decode every item; a ``BadSampleError`` becomes
    that sample's ``bad_reason`` (other errors propagate: they are bugs or missing files)."""
    loaded = []
    for item in items:
        try:
            image_bytes, meta = read(item)
            pixels = None
            if settings.decode_pixels:
                pixels = decode_pil(image_bytes, settings.policy, settings.norm,
                                    use_draft=settings.use_draft).numpy()
        except BadSampleError as err:
            loaded.append(LoadedSample(bad_reason=err.reason, bad_detail=str(err)))
            continue
        loaded.append(LoadedSample(meta, pixels))
    return loaded


# --- the worker side -------------------------------------------------------------------------

_worker_files: ShardFiles | None = None


def _init_worker() -> None:
    global _worker_files
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(1)  # N workers beside the trainer: no intra-op threads each
    _worker_files = ShardFiles()
    parent = multiprocessing.parent_process()
    if parent is not None:  # the training process: leave with it, even if it was SIGKILLed
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()


def _exit_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def _load_in_worker(locations: list[SampleLocation], settings: DecodeSettings
                    ) -> list[LoadedSample]:
    return load_samples(_worker_files.read, locations, settings)


def _image_only(image_bytes: bytes) -> tuple[bytes, None]:
    return image_bytes, None


def decode_images(images: list[bytes], settings: DecodeSettings) -> list[LoadedSample]:
    """``load_samples`` of images already read (no meta): one ``LoadedSample`` per image."""
    return load_samples(_image_only, images, settings)


# --- the main side ---------------------------------------------------------------------------

class DecodePool:
    """``num_workers`` processes decoding packs; results come back as futures, so the caller
    consumes them in the order it submitted. Started on first use; ``close()`` stops the
    processes (a later ``submit`` starts new ones)."""

    def __init__(self, num_workers: int):
        if num_workers < 1:
            raise ValueError(f"a decode pool needs at least one worker, got {num_workers}")
        self.num_workers = num_workers
        self._executor: ProcessPoolExecutor | None = None
        self._finalizer = None

    def submit(self, locations: list[SampleLocation], settings: DecodeSettings) -> Future:
        """Read and decode the samples at ``locations``: a future of ``[LoadedSample]``."""
        return self._started().submit(_load_in_worker, locations, settings)

    def submit_images(self, images: list[bytes], settings: DecodeSettings) -> Future:
        """Decode images read by the caller (``decode_images``): a future of
        ``[LoadedSample]`` without metas."""
        return self._started().submit(decode_images, images, settings)

    def _started(self) -> ProcessPoolExecutor:
        if self._executor is None:
            # this module imported once in the server, not per worker
            context = forkserver_context([__name__])
            self._executor = ProcessPoolExecutor(self.num_workers, mp_context=context,
                                                 initializer=_init_worker)
            # a loader dropped without close() (e.g. an evaluation's) still stops its workers
            self._finalizer = weakref.finalize(self, self._executor.shutdown, wait=False,
                                               cancel_futures=True)
        return self._executor

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids (empty when not started)."""
        return [] if self._executor is None else list(self._executor._processes)

    def close(self) -> None:
        """Cancel queued work and wait for the workers to exit."""
        if self._executor is not None:
            self._finalizer.detach()
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
