"""ShardWriter / iter_shard round trip, WebDataset layout, atomic publishing, box validation."""

import io
import json
import math
import tarfile

import pytest
from PIL import Image

from megatron_finevit.data.bad_samples import BadSampleCounter
from megatron_finevit.data.shards import ShardWriter, iter_shard, list_shards, validate_boxes


def jpeg(width=64, height=48, color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "JPEG")
    return buf.getvalue()


def test_round_trip_and_layout(tmp_path):
    samples = {f"k{i:03d}": (jpeg(color=(i, 2 * i, 3 * i)),
                             {"caption": f"caption {i} – ünïcödé", "width": 64, "height": 48,
                              "regions": [{"box": [1, 2, 30, 40], "caption": "r", "label": "l",
                                           "score": 0.5}],
                              "ocr": [{"box": [0, 0, 64, 48], "text": "T"}]})
               for i in range(7)}
    with ShardWriter(tmp_path, prefix="ds", max_samples_per_shard=3) as writer:
        for key, (image, meta) in samples.items():
            writer.write(key, image, meta)
    shards = list_shards(tmp_path)
    assert [p.name for p in shards] == ["ds-000000.tar", "ds-000001.tar", "ds-000002.tar"]
    assert writer.written_shards == shards
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind

    # Plain tarfile sees the WebDataset layout: {key}.jpg then {key}.json, in order.
    with tarfile.open(shards[0]) as tar:
        assert tar.getnames() == ["k000.jpg", "k000.json", "k001.jpg", "k001.json", "k002.jpg",
                                  "k002.json"]
        assert json.loads(tar.extractfile("k001.json").read()) == samples["k001"][1]

    counter = BadSampleCounter()
    read = {key: (image, meta) for path in shards for key, image, meta in iter_shard(path, counter)}
    assert read == samples
    assert counter.good == 7 and counter.num_skipped == 0


def test_writer_is_deterministic(tmp_path):
    for out in ("a", "b"):
        with ShardWriter(tmp_path / out) as writer:
            writer.write("x", jpeg(), {"caption": "c", "width": 64, "height": 48})
    first, second = (tmp_path / d / "shard-000000.tar" for d in ("a", "b"))
    assert first.read_bytes() == second.read_bytes()


def test_failed_write_publishes_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path) as writer:
            writer.write("a", jpeg(), {"caption": "c", "width": 64, "height": 48})
            raise RuntimeError("crash mid-shard")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["a.b", "../x", "/abs", "", "sp ace"])
def test_bad_keys_rejected(tmp_path, key):
    with ShardWriter(tmp_path) as writer, pytest.raises(ValueError):
        writer.write(key, jpeg(), {})


def test_duplicate_key_rejected(tmp_path):
    with ShardWriter(tmp_path) as writer:
        writer.write("a", jpeg(), {"caption": "", "width": 64, "height": 48})
        with pytest.raises(ValueError):
            writer.write("a", jpeg(), {"caption": "", "width": 64, "height": 48})


def test_validate_boxes():
    entries = [{"box": [0, 0, 10, 10]},                 # kept
               {"box": [5.5, 1, 100, 50]},              # kept: touches the right/bottom edge
               {"box": [10, 0, 5, 10]},                 # inverted
               {"box": [0, 0, 0, 10]},                  # empty
               {"box": [-1, 0, 10, 10]},                # outside
               {"box": [0, 0, 101, 10]},                # outside
               {"box": [0, 0, math.nan, 10]},           # NaN
               {"box": [0, 0, math.inf, 10]},           # inf
               {"box": [0, 0, 10]},                     # wrong length
               {"box": ["0", 0, 1, 1]},                 # not a number
               {}]                                      # missing
    counter = BadSampleCounter()
    kept = validate_boxes(entries, width=100, height=50, counter=counter)
    assert kept == entries[:2]
    assert counter.dropped == {"box_inverted": 2, "box_outside": 2, "box_invalid": 5}
    assert counter.num_skipped == 0  # dropping boxes does not make the sample bad
