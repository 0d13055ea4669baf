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
from megatron_finevit.data.shards import ShardWriter, iter_shard, list_shards

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
    shard_dir, keys = Path(shard_dir), set(keys)
    for path in list_shards(shard_dir):
        prefix, number = path.stem.rsplit("-", 1)
        samples = list(iter_shard(path))
        with tempfile.TemporaryDirectory(dir=shard_dir) as tmp:
            with ShardWriter(tmp, prefix=prefix, max_samples_per_shard=len(samples) + 1,
                             start_index=int(number)) as writer:
                for key, image, meta in samples:
                    writer.write(key, cut_jpeg_body(image) if key in keys else image, meta)
            os.replace(writer.written_shards[0], path)
    build_index(shard_dir, progress=False)


def next_pack_keys(loader, count: int) -> list[list[str]]:
    """Keys of the next ``count`` packs ``loader``'s sampler draws, without reading samples
    (it advances that loader: use a throw-away one built like the run's)."""
    return [[str(loader.index.key[s]) for s in next(iter(loader.sampler))] for _ in range(count)]
