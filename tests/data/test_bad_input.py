"""Every kind of broken input is skipped (or dropped), counted under its reason, and logged; too
many broken samples abort with a clear message."""

import io
import json
import logging
import struct
import tarfile
import zlib

import pytest
from PIL import Image

from megatron_finevit.data.bad_samples import BadSampleCounter, BadSampleError
from megatron_finevit.data.decode_pil import decode_pil, iter_decoded
from megatron_finevit.data.index import build_index, load_index
from megatron_finevit.data.shards import iter_shard


def encode(width, height, fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((width, height)).convert("RGB").save(buf, fmt)
    return buf.getvalue()


def png_header_only(width, height) -> bytes:
    """A PNG that *declares* width×height but holds no pixel data (a bomb costs ~60 bytes)."""
    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def meta(width=64, height=48, **extra):
    return {"caption": "a sample", "width": width, "height": height, **extra}


def write_tar(path, members):
    """Raw tar with the given (name, bytes) members: lets tests build what ShardWriter refuses."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def good(key, width=64, height=48):
    return sample(key, encode(width, height), meta(width, height))


def sample(key, image_bytes, meta_json):
    body = meta_json if isinstance(meta_json, bytes) else json.dumps(meta_json).encode()
    return [(f"{key}.jpg", image_bytes), (f"{key}.json", body)]


def read_all(path):
    counter = BadSampleCounter(min_samples=10_000)
    keys = [key for key, _, _ in iter_shard(path, counter)]
    return keys, counter


def decode_reason(image_bytes) -> str:
    with pytest.raises(BadSampleError) as info:
        decode_pil(image_bytes)
    return info.value.reason


def test_corrupt_jpeg():
    data = bytearray(encode(200, 150))
    data[2:60] = b"\x00" * 58  # destroy the JPEG markers after SOI
    assert decode_reason(bytes(data)) == "corrupt_image"
    assert decode_reason(b"definitely not an image") == "corrupt_image"


def test_png_with_corrupt_image_data_is_refused():
    """Pillow skips the CRC of IDAT chunks: one flipped bit decodes silently into other pixels
    unless the chunk CRCs are checked."""
    rgb = Image.radial_gradient("L").convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[data.find(b"IDAT") + 100] ^= 0x10
    assert decode_reason(bytes(data)) == "corrupt_image"
    assert decode_reason(buf.getvalue()[:-20]) == "truncated_image"  # cut before IEND
    assert decode_pil(buf.getvalue()).shape == (3, 252, 252)  # the intact file still decodes


def test_truncated_jpeg():
    data = encode(400, 300)
    assert decode_reason(data[: len(data) // 2]) == "truncated_image"


def test_zero_and_one_pixel_images():
    assert decode_reason(encode(1, 1, "PNG")) == "degenerate_size"
    assert decode_reason(encode(1, 300, "PNG")) == "degenerate_size"
    assert decode_reason(png_header_only(0, 10)) in ("corrupt_image", "degenerate_size")


def test_extreme_aspect_ratio():
    assert decode_reason(encode(1000, 200)) == "extreme_aspect_ratio"  # 5:1
    assert decode_pil(encode(600, 200)).shape[0] == 3  # exactly 3:1 is allowed


def test_decompression_bomb_rejected_from_header():
    # 9000² = 81 MPix: over our cap (8192²) but under Pillow's own error threshold.
    assert decode_reason(png_header_only(9000, 9000)) == "decompression_bomb"
    # 100000² = 10 GPix: Pillow itself refuses in Image.open; still reported as a bomb.
    assert decode_reason(png_header_only(100_000, 100_000)) == "decompression_bomb"


def test_truncated_tar_keeps_every_whole_sample_before_the_cut(tmp_path):
    full = write_tar(tmp_path / "full.tar", good("a") + good("b") + good("c"))
    data = full.read_bytes()
    with tarfile.open(full) as tar:
        members = tar.getmembers()
    # Oracle: a sample is whole once the data of its last member (the JSON) is in the file.
    whole_at = {m.name.split(".")[0]: m.offset_data + m.size for m in members}
    end_marker = members[-1].offset_data + -(-members[-1].size // 512) * 512
    cut = tmp_path / "cut.tar"
    boundaries = [m.offset for m in members]  # cuts exactly between members (and samples)
    for length in [*range(1, end_marker + 1024, 97), *boundaries, end_marker, end_marker + 512]:
        cut.write_bytes(data[:length])  # cuts in headers, in data, at member boundaries
        keys, counter = read_all(cut)
        assert keys == [k for k in "abc" if whole_at[k] <= length], length
        # A cut inside the very first header cannot be told from a file that is not a tar.
        assert counter.skipped == {"corrupt_tar" if length < 512 else "truncated_tar": 1}, length
    cut.write_bytes(data[: end_marker + 1024])  # the marker is complete: nothing is missing
    assert read_all(cut)[0] == ["a", "b", "c"] and read_all(cut)[1].num_skipped == 0
    not_a_tar = tmp_path / "junk.tar"
    not_a_tar.write_bytes(b"\x01" * 1000)
    assert read_all(not_a_tar)[1].skipped == {"corrupt_tar": 1}


@pytest.mark.parametrize("members,reason", [
    ([("k.jpg", encode(64, 48))], "missing_json"),
    ([("k.json", json.dumps(meta()).encode())], "missing_image"),
    ([("k.jpg", encode(64, 48)), ("k.json", b"{not json")], "invalid_json"),
    ([("k.jpg", encode(64, 48)), ("k.json", b"[1, 2]")], "invalid_json"),
    (sample("k", encode(64, 48), '{"caption": "caf\u00e9", "width": 64, "height": 48}'.encode("latin-1")),
     "non_utf8"),
    (sample("k", encode(64, 48), {"caption": 5, "width": 64, "height": 48}), "invalid_meta"),
    (sample("k", encode(64, 48), {"caption": "x"}), "invalid_meta"),
    ([("../evil.jpg", encode(64, 48))], "unsafe_member"),
    ([("/abs/evil.jpg", encode(64, 48))], "unsafe_member"),
])
def test_broken_samples_skipped_counted_logged(tmp_path, caplog, members, reason):
    path = write_tar(tmp_path / "s-000000.tar", good("first") + members + good("last"))
    with caplog.at_level(logging.WARNING):
        keys, counter = read_all(path)
    assert keys == ["first", "last"]
    assert counter.skipped == {reason: 1} and counter.good == 2
    assert any(reason in rec.getMessage() and "s-000000.tar" in rec.getMessage()
               for rec in caplog.records)


def test_bad_boxes_dropped_and_sample_kept(tmp_path, caplog):
    regions = [{"box": [0, 0, 10, 10], "caption": "ok", "label": "x", "score": 1.0},
               {"box": [0, 0, 100, 10], "caption": "outside", "label": "x", "score": 1.0},
               {"box": [9, 9, 1, 1], "caption": "inverted", "label": "x", "score": 1.0}]
    ocr = [{"box": [0, 0, float("nan"), 5], "text": "nan"}, {"box": [1, 1, 5, 5], "text": 3}]
    body = json.dumps(meta(regions=regions, ocr=ocr)).encode()  # json writes NaN literally
    path = write_tar(tmp_path / "s-000000.tar", [("k.jpg", encode(64, 48)), ("k.json", body)])
    with caplog.at_level(logging.INFO):
        samples = list(iter_shard(path, counter := BadSampleCounter()))
    assert len(samples) == 1
    assert [r["caption"] for r in samples[0][2]["regions"]] == ["ok"]
    assert samples[0][2]["ocr"] == []
    assert counter.dropped == {"box_outside": 1, "box_inverted": 1, "box_invalid": 1,
                               "ocr_malformed": 1}
    assert any("box_outside" in rec.getMessage() for rec in caplog.records)


def test_decode_failures_counted_in_decoded_iteration(tmp_path):
    data = encode(400, 300)
    truncated = data[: len(data) // 2]
    members = good("a") + sample("b", truncated, meta(400, 300)) + good("c")
    path = write_tar(tmp_path / "s-000000.tar", members)
    counter = BadSampleCounter(min_samples=10_000)
    assert [key for key, _, _ in iter_decoded([path], counter=counter)] == ["a", "c"]
    assert counter.skipped == {"truncated_image": 1}


def test_index_excludes_bad_samples(tmp_path):
    members = (good("a") + sample("b", png_header_only(9000, 9000), meta(9000, 9000))
               + sample("c", encode(1000, 200), meta(1000, 200)) + good("d"))
    write_tar(tmp_path / "s-000000.tar", members)
    counter = BadSampleCounter(min_samples=10_000)
    build_index(tmp_path, counter=counter, progress=False)
    assert list(load_index(tmp_path).key) == ["a", "d"]
    assert counter.skipped == {"decompression_bomb": 1, "extreme_aspect_ratio": 1}
    idx_lines = (tmp_path / "dali_index/s-000000.idx").read_text().splitlines()
    assert idx_lines[0] == "v1.2 2"
    assert idx_lines[1].endswith("a.json") and idx_lines[2].endswith("d.json")


def test_bad_fraction_over_threshold_aborts(tmp_path):
    members = []
    for i in range(20):
        members += good(f"g{i}") if i % 4 else [(f"b{i}.jpg", encode(64, 48)), (f"b{i}.json", b"{")]
    path = write_tar(tmp_path / "s-000000.tar", members)  # 5 of 20 bad = 25%
    with pytest.raises(RuntimeError, match=r"too many bad samples: \d+ of \d+ .*invalid_json"):
        list(iter_shard(path, BadSampleCounter(max_bad_fraction=0.10, min_samples=10)))
    # Under the threshold the same data passes with the bad ones counted.
    counter = BadSampleCounter(max_bad_fraction=0.40, min_samples=10)
    assert len(list(iter_shard(path, counter))) == 15 and counter.skipped == {"invalid_json": 5}
    assert "15 good samples, 5 skipped (25.00%; invalid_json=5)" in counter.summary()
