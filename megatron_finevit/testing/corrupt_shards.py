"""Broken samples the index cannot see, for tests of bad data under parallel layouts.

``truncate_image_bodies`` cuts chosen JPEGs a few bytes after their start-of-scan marker: the
header still parses (the index reads only headers, so the sample is indexed with its true size)
but decoding fails ("truncated_image") — the case where pipeline stages that decode and stages
that only read the layout would disagree. ``next_pack_keys`` says which samples a loader's next
packs hold, so a test can break one sample of a pack or every sample of one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from megatron_finevit.data.index import build_index
from megatron_finevit.data.shards import ShardWriter, iter_shard_samples, list_shards

_START_OF_SCAN = b"\xff\xda"


def cut_jpeg_body(jpeg: bytes, keep: int = 40) -> bytes:
    """``jpeg`` cut ``keep`` bytes into its entropy-coded data (header intact)."""
    start = jpeg.find(_START_OF_SCAN)
    if start < 0:
        raise ValueError("not a baseline JPEG: no start-of-scan marker")
    return jpeg[:start + keep]


def truncate_image_bodies(shard_dir: str | os.PathLike, keys) -> None:
    """Rewrite the shards of ``shard_dir`` (same names, keys and order) with the JPEG of every
    sample in ``keys`` cut after its header, then rebuild the index."""
    cut_image_bodies(shard_dir, {(key, 0) for key in keys})


def cut_image_bodies(shard_dir: str | os.PathLike, images) -> None:
    """As ``truncate_image_bodies`` for samples of any number of images: ``images`` holds
    ``(key, i)`` pairs, image ``i`` of sample ``key`` (a JPEG) is cut after its header."""
    shard_dir, images = Path(shard_dir), set(images)
    for path in list_shards(shard_dir):
        prefix, number = path.stem.rsplit("-", 1)
        samples = list(iter_shard_samples(path))
        with tempfile.TemporaryDirectory(dir=shard_dir) as tmp:
            with ShardWriter(tmp, prefix=prefix, max_samples_per_shard=len(samples) + 1,
                             start_index=int(number)) as writer:
                for key, members, meta, _ in samples:
                    writer.write_images(key, [  # members "jpg", "1.jpg", ...: ext "jpg"
                        (cut_jpeg_body(data) if (key, i) in images else data,
                         member.rsplit(".", 1)[-1]) for i, (member, data) in enumerate(members)],
                        meta)
            os.replace(writer.written_shards[0], path)
    build_index(shard_dir, progress=False)


def next_pack_keys(loader, count: int) -> list[list[str]]:
    """Keys of the next ``count`` packs ``loader``'s sampler draws, without reading samples
    (it advances that loader: use a throw-away one built like the run's)."""
    return [[str(loader.index.key[s]) for s in next(iter(loader.sampler))] for _ in range(count)]


def shards_with_broken_packs(path: str | os.PathLike, make_loader, num: int = 64) -> Path:
    """``num`` indexed FineCap-mini samples at ``path`` in which the second pack that
    ``make_loader(path, decode_pixels=False)`` draws holds one truncated JPEG and every sample of
    the third is one (the loader tests' bad data: one skip, then an all-bad pack)."""
    from megatron_finevit.data.synthetic import make_synthetic_shards

    make_synthetic_shards(path, num, seed=4, samples_per_shard=32, progress=False)
    build_index(path, progress=False)
    packs = next_pack_keys(make_loader(path, decode_pixels=False), 3)
    truncate_image_bodies(path, [packs[1][0], *packs[2]])
    return Path(path)


def loader_steps(loader, start: int, stop: int) -> list:
    """The loader's batches of steps ``start .. stop - 1`` (its step set before each)."""
    batches = []
    for step in range(start, stop):
        loader.set_step(step)
        batches.append(next(loader))
    return batches
