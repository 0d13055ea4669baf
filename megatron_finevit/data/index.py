"""Zarr index of per-sample metadata for a shard directory, built incrementally, checked on load.

The packer needs every sample's token cost before decoding anything; reading all tars each epoch
would be too slow, so `build_index` scans the shards once and stores, per usable sample:

    height, width                    original size (after EXIF orientation), pixels
    resized_height, resized_width    ResizePolicy.target_size, pixels
    num_patches                      patch tokens after resizing (patch 14)
    num_images                       images of the sample (1, or 0..n for conversations)
    caption_tokens                   token count of the global caption
    region_tokens, ocr_tokens        summed token counts of region captions / OCR strings
    num_regions, num_ocr             number of valid regions / OCR boxes
    shard_id                         position of the shard in `SampleIndex.shards`
    key                              WebDataset sample key inside the shard

Token counts come from `token_counter(text) -> int`; the default `approx_token_count` is
ceil(UTF-8 chars / 4), the usual BPE average for English. Pass a real tokenizer's
`lambda s: len(tok.encode(s))` for exact budgets; its name is recorded and checked on load.

Layout: `SHARD_DIR/index.zarr` (one 1-D array per column, attrs hold the policy and, per shard,
name + size + mtime_ns + sample count) and `SHARD_DIR/dali_index/{shard}.idx` (DALI's webdataset
index format v1.2 listing only the samples that passed the checks, so DALI never reads a sample
the PIL path would skip). Rebuilding is incremental: only shards not yet recorded are read. A
changed or removed shard, or a different policy / token counter, rebuilds the index from scratch.
`load_index` refuses a stale index with `StaleIndexError`.

A sample with several images (`shards` module docstring) records the size columns of its first
image and `num_patches` summed over all of them; a text-only sample records 0 for all of these.
Its DALI index line lists every image member, then the JSON.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr
from tqdm import tqdm

from megatron_finevit.data.bad_samples import BadSampleCounter, BadSampleError
from megatron_finevit.data.decode_pil import DEFAULT_MAX_DECODE_PIXELS, open_image
from megatron_finevit.data.resize import ResizePolicy, num_patches
from megatron_finevit.data.shards import iter_shard_samples, list_shards

logger = logging.getLogger(__name__)

INDEX_NAME = "index.zarr"
DALI_INDEX_DIR = "dali_index"
FORMAT_VERSION = 2  # 2: num_images column, samples with 0..n images
_CHUNK = 65536


class StaleIndexError(RuntimeError):
    """The zarr index does not describe the shards on disk (or was built with another policy)."""


def approx_token_count(text: str) -> int:
    """Cheap token-count proxy: ceil(characters / 4)."""
    return math.ceil(len(text) / 4)


@dataclasses.dataclass
class SampleIndex:
    """Per-sample columns (all 1-D, length = number of usable samples)."""

    shard_dir: Path
    shards: list[str]
    policy: ResizePolicy
    height: np.ndarray
    width: np.ndarray
    resized_height: np.ndarray
    resized_width: np.ndarray
    num_patches: np.ndarray
    num_images: np.ndarray
    caption_tokens: np.ndarray
    region_tokens: np.ndarray
    ocr_tokens: np.ndarray
    num_regions: np.ndarray
    num_ocr: np.ndarray
    shard_id: np.ndarray
    key: np.ndarray

    def __len__(self) -> int:
        return len(self.key)

    def shard_path(self, sample: int) -> Path:
        return self.shard_dir / self.shards[int(self.shard_id[sample])]


_INT_COLUMNS = tuple(f.name for f in dataclasses.fields(SampleIndex)
                     if f.name not in ("shard_dir", "shards", "policy", "key"))


def dp_partition(num_samples: int, dp_rank: int, dp_size: int) -> range:
    """Contiguous, balanced, disjoint slice of sample positions for one data-parallel rank.

    Rank r gets [floor(N·r/n), floor(N·(r+1)/n)): the same split DALI readers use for
    `shard_id=r, num_shards=n`, so both paths agree on which rank reads which sample.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
    return range(num_samples * dp_rank // dp_size, num_samples * (dp_rank + 1) // dp_size)


def shard_fingerprint(path: Path) -> dict:
    stat = path.stat()
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def dali_index_path(shard_dir: str | os.PathLike, shard_name: str) -> Path:
    return Path(shard_dir) / DALI_INDEX_DIR / (Path(shard_name).stem + ".idx")


def _stale_reasons(attrs: dict, shard_paths: list[Path], policy: ResizePolicy | None,
                   token_counter_name: str | None, num_rows: int) -> list[str]:
    """Why an existing index does not match the shards/policy (empty list: it matches)."""
    reasons = []
    if attrs.get("format_version") != FORMAT_VERSION:
        reasons.append(f"format version {attrs.get('format_version')} != {FORMAT_VERSION}")
    if policy is not None and attrs.get("resize_policy") != policy.to_dict():
        reasons.append(f"resize policy {attrs.get('resize_policy')} != {policy.to_dict()}")
    if token_counter_name is not None and attrs.get("token_counter") != token_counter_name:
        reasons.append(f"token counter {attrs.get('token_counter')!r} != {token_counter_name!r}")
    on_disk = {p.name: p for p in shard_paths}
    for rec in attrs.get("shards", []):
        path = on_disk.get(rec["name"])
        if path is None:
            reasons.append(f"shard {rec['name']} was removed")
        elif {k: rec[k] for k in ("name", "size", "mtime_ns")} != shard_fingerprint(path):
            reasons.append(f"shard {rec['name']} changed (size or mtime)")
    if sum(rec["num_samples"] for rec in attrs.get("shards", [])) != num_rows:
        reasons.append("row count does not match the recorded shards (interrupted build?)")
    return reasons


def build_index(shard_dir: str | os.PathLike, policy: ResizePolicy = ResizePolicy(),
                token_counter: Callable[[str], int] = approx_token_count,
                token_counter_name: str | None = None,
                max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS,
                counter: BadSampleCounter | None = None, progress: bool = True) -> dict:
    """Create or extend `shard_dir/index.zarr`; returns {"shards_read", "samples_added", "rebuilt"}.

    Reads only the image header of each sample (size + pixel cap), never decodes pixels.
    """
    shard_dir = Path(shard_dir)
    shard_paths = list_shards(shard_dir)
    if not shard_paths:
        raise FileNotFoundError(f"no shards named PREFIX-NNNNNN.tar in {shard_dir}")
    token_counter_name = token_counter_name or getattr(token_counter, "__name__", "custom")
    counter = counter if counter is not None else BadSampleCounter(name="build_index")
    index_path = shard_dir / INDEX_NAME

    rebuilt = False
    group = zarr.open_group(index_path, mode="r") if index_path.exists() else None
    if group is not None:
        reasons = _stale_reasons(dict(group.attrs), shard_paths, policy, token_counter_name,
                                 group["key"].shape[0])
        if reasons:
            logger.warning("rebuilding %s from scratch: %s", index_path, "; ".join(reasons))
            shutil.rmtree(index_path)
            shutil.rmtree(shard_dir / DALI_INDEX_DIR, ignore_errors=True)
            group, rebuilt = None, True
    if group is None:
        group = _create_index(index_path, policy, token_counter_name)
    else:
        group = zarr.open_group(index_path, mode="r+")

    records = list(group.attrs["shards"])
    known = {rec["name"] for rec in records}
    new_paths = [p for p in shard_paths if p.name not in known]
    (shard_dir / DALI_INDEX_DIR).mkdir(exist_ok=True)
    added = 0
    for path in tqdm(new_paths, desc="indexing shards", unit="shard",
                     disable=not progress or not new_paths):
        fingerprint = shard_fingerprint(path)  # before reading: a concurrent rewrite looks stale
        rows, dali_lines = _scan_shard(path, len(records), policy, token_counter,
                                       max_decode_pixels, counter)
        _write_dali_index(dali_index_path(shard_dir, path.name), dali_lines)
        for name, values in rows.items():
            group[name].append(values)
        records.append({**fingerprint, "num_samples": len(dali_lines)})
        group.attrs["shards"] = records  # after the rows: an interrupted build reads as stale
        added += len(dali_lines)
    if new_paths:
        logger.info("index %s: %d shards read, %d samples added, %d samples total; %s",
                    index_path, len(new_paths), added, group["key"].shape[0], counter.summary())
    else:  # the counter's "0 good samples" would read as if the data were bad
        logger.info("index %s is up to date: 0 new samples, %d samples total", index_path,
                    group["key"].shape[0])
    return {"shards_read": [p.name for p in new_paths], "samples_added": added,
            "rebuilt": rebuilt}


def _create_index(index_path: Path, policy: ResizePolicy, token_counter_name: str) -> zarr.Group:
    group = zarr.open_group(index_path, mode="w")
    for name in _INT_COLUMNS:
        group.create_array(name, shape=(0,), dtype="int32", chunks=(_CHUNK,))
    group.create_array("key", shape=(0,), dtype=str, chunks=(_CHUNK,))
    group.attrs.update({"format_version": FORMAT_VERSION, "resize_policy": policy.to_dict(),
                        "token_counter": token_counter_name, "shards": []})
    return group


def _scan_shard(path: Path, shard_id: int, policy: ResizePolicy, token_counter, max_decode_pixels,
                counter: BadSampleCounter) -> tuple[dict[str, np.ndarray], list[str]]:
    rows = {name: [] for name in (*_INT_COLUMNS, "key")}
    dali_lines = []
    for key, images, meta, layout in iter_shard_samples(path, counter):
        try:
            sizes = []  # (height, width, resized height, resized width) per image
            for _, image_bytes in images:
                _, height, width = open_image(image_bytes, max_decode_pixels)
                sizes.append((height, width, *policy.target_size(height, width)))
        except BadSampleError as err:
            counter.skip_error(err, shard=path.name, member=key)
            continue
        counter.ok()
        height, width, resized_h, resized_w = sizes[0] if sizes else (0, 0, 0, 0)
        values = {
            "height": height, "width": width, "resized_height": resized_h,
            "resized_width": resized_w,
            "num_patches": sum(num_patches(rh, rw, policy.patch_size) for _, _, rh, rw in sizes),
            "num_images": len(sizes),
            "caption_tokens": token_counter(meta.get("caption", "")),
            "region_tokens": sum(token_counter(r["caption"]) for r in meta["regions"]),
            "ocr_tokens": sum(token_counter(o["text"]) for o in meta["ocr"]),
            "num_regions": len(meta["regions"]), "num_ocr": len(meta["ocr"]),
            "shard_id": shard_id, "key": key,
        }
        for name, value in values.items():
            rows[name].append(value)
        members = [ext for ext, _ in images] + ["json"]
        dali_lines.append(" ".join(f"{ext} {layout[ext][1]} {layout[ext][2]} {layout[ext][0]}"
                                   for ext in members))
    columns = {name: np.asarray(rows[name], dtype=np.int32) for name in _INT_COLUMNS}
    columns["key"] = np.asarray(rows["key"], dtype=str)
    return columns, dali_lines


def _write_dali_index(path: Path, lines: list[str]) -> None:
    """DALI webdataset index v1.2: header "v1.2 N", then per sample "ext offset size name ..."."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join([f"v1.2 {len(lines)}\n"] + [line + "\n" for line in lines]))
    os.replace(tmp, path)


def load_index(shard_dir: str | os.PathLike, policy: ResizePolicy | None = None,
               token_counter_name: str | None = None) -> SampleIndex:
    """Load `shard_dir/index.zarr`, checking that it still describes the shards on disk.

    Raises FileNotFoundError if there is no index, StaleIndexError if a shard changed, was removed
    or added, or if `policy` / `token_counter_name` (when given) differ from the recorded ones.
    """
    shard_dir = Path(shard_dir)
    index_path = shard_dir / INDEX_NAME
    if not index_path.exists():
        raise FileNotFoundError(f"no index at {index_path}: run "
                                f"`python tools/build_index.py {shard_dir}` first")
    group = zarr.open_group(index_path, mode="r")
    attrs = dict(group.attrs)
    shard_paths = list_shards(shard_dir)
    reasons = _stale_reasons(attrs, shard_paths, policy, token_counter_name, group["key"].shape[0])
    recorded = {rec["name"] for rec in attrs["shards"]}
    reasons += [f"shard {p.name} is not indexed" for p in shard_paths if p.name not in recorded]
    if reasons:
        raise StaleIndexError(f"index {index_path} is stale: {'; '.join(reasons)}. Re-run "
                              f"`python tools/build_index.py {shard_dir}` (with the same "
                              "--min-pixels/--max-pixels as training).")
    columns = {name: group[name][:] for name in (*_INT_COLUMNS, "key")}
    columns["key"] = columns["key"].astype(object)  # plain Python str values
    return SampleIndex(shard_dir=shard_dir, shards=[rec["name"] for rec in attrs["shards"]],
                       policy=ResizePolicy(**attrs["resize_policy"]), **columns)
