"""Zarr index: values against a direct full decode, incremental re-runs, staleness, DP split."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_finevit.data import index as index_module
from megatron_finevit.data.index import (StaleIndexError, approx_token_count, build_index,
                                         dp_partition, load_index)
from megatron_finevit.data.resize import ResizePolicy
from megatron_finevit.data.shards import iter_shard, list_shards
from megatron_finevit.data.synthetic import make_synthetic_shards

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def shard_dir(tmp_path):
    make_synthetic_shards(tmp_path, num=12, seed=5, samples_per_shard=4, progress=False)
    return tmp_path


def test_values_match_direct_computation(shard_dir):
    """Oracle: fully decode each image with PIL and recompute every column by hand."""
    policy = ResizePolicy(max_pixels=448 * 448)
    build_index(shard_dir, policy, progress=False)
    index = load_index(shard_dir, policy)
    assert len(index) == 12 and index.policy == policy
    row = 0
    for shard_id, path in enumerate(list_shards(shard_dir)):
        for key, image_bytes, meta in iter_shard(path):
            width, height = Image.open(io.BytesIO(image_bytes)).convert("RGB").size
            rh, rw = policy.target_size(height, width)
            assert (index.key[row], index.shard_id[row]) == (key, shard_id)
            assert index.shard_path(row) == path
            assert (index.height[row], index.width[row]) == (height, width)
            assert (index.resized_height[row], index.resized_width[row]) == (rh, rw)
            assert index.num_patches[row] == (rh // 14) * (rw // 14)
            assert index.caption_tokens[row] == -(-len(meta["caption"]) // 4)
            assert index.num_regions[row] == len(meta["regions"])
            assert index.ocr_tokens[row] == sum(-(-len(o["text"]) // 4) for o in meta["ocr"])
            row += 1
    assert row == 12


def test_custom_token_counter_recorded_and_checked(shard_dir):
    def words(text):
        return len(text.split())
    build_index(shard_dir, token_counter=words, progress=False)
    index = load_index(shard_dir, token_counter_name="words")
    first_caption = next(iter_shard(list_shards(shard_dir)[0]))[2]["caption"]
    assert index.caption_tokens[0] == len(first_caption.split())
    with pytest.raises(StaleIndexError, match="token counter"):
        load_index(shard_dir, token_counter_name="approx_token_count")


def test_incremental_reads_only_new_shards(shard_dir, monkeypatch):
    first = build_index(shard_dir, progress=False)
    assert first["shards_read"] == [p.name for p in list_shards(shard_dir)] and not first["rebuilt"]
    before = load_index(shard_dir)

    # A new shard arrives: only it is read (counted by wrapping the per-shard scan).
    make_synthetic_shards(shard_dir, num=3, seed=9, prefix="extra", progress=False)
    scanned = []
    real_scan = index_module._scan_shard
    monkeypatch.setattr(index_module, "_scan_shard",
                        lambda path, *a: scanned.append(path.name) or real_scan(path, *a))
    second = build_index(shard_dir, progress=False)
    assert scanned == ["extra-000000.tar"] and second["samples_added"] == 3
    after = load_index(shard_dir)
    assert len(after) == len(before) + 3
    np.testing.assert_array_equal(after.num_patches[: len(before)], before.num_patches)
    assert list(after.key[-3:]) == ["00000000", "00000001", "00000002"]
    assert after.shards[after.shard_id[-1]] == "extra-000000.tar"

    # Nothing new: nothing read.
    scanned.clear()
    assert build_index(shard_dir, progress=False)["shards_read"] == [] and scanned == []


def test_cli_builds_index(shard_dir):
    subprocess.run([sys.executable, str(REPO / "tools/build_index.py"), str(shard_dir),
                    "--max-pixels", str(336 * 336)], check=True, capture_output=True)
    assert load_index(shard_dir, ResizePolicy(max_pixels=336 * 336)).num_patches.max() <= 24 * 24


def test_stale_index_detected(shard_dir):
    build_index(shard_dir, progress=False)
    load_index(shard_dir)
    shards = list_shards(shard_dir)

    with pytest.raises(StaleIndexError, match="resize policy.*build_index"):
        load_index(shard_dir, ResizePolicy(max_pixels=256 * 256))

    make_synthetic_shards(shard_dir, num=1, seed=1, prefix="late", progress=False)
    with pytest.raises(StaleIndexError, match="late-000000.tar is not indexed"):
        load_index(shard_dir)
    build_index(shard_dir, progress=False)
    load_index(shard_dir)

    stat = shards[1].stat()
    os.utime(shards[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten in place
    with pytest.raises(StaleIndexError, match=f"{shards[1].name} changed"):
        load_index(shard_dir)
    result = build_index(shard_dir, progress=False)  # a changed shard rebuilds everything
    assert result["rebuilt"] and len(result["shards_read"]) == 4
    load_index(shard_dir)

    shards[2].unlink()
    with pytest.raises(StaleIndexError, match=f"{shards[2].name} was removed"):
        load_index(shard_dir)
    build_index(shard_dir, progress=False)
    assert len(load_index(shard_dir)) == 12 - 4 + 1


def test_missing_index_message(tmp_path):
    make_synthetic_shards(tmp_path, num=1, progress=False)
    with pytest.raises(FileNotFoundError, match="build_index.py"):
        load_index(tmp_path)


@pytest.mark.parametrize("num_samples", [0, 1, 7, 100, 101])
@pytest.mark.parametrize("dp_size", [1, 2, 3, 8])
def test_dp_partition_disjoint_and_complete(num_samples, dp_size):
    parts = [dp_partition(num_samples, r, dp_size) for r in range(dp_size)]
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(num_samples)) and len(flat) == len(set(flat))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_approx_token_count():
    assert [approx_token_count(s) for s in ("", "a", "abcd", "abcde")] == [0, 1, 1, 2]
