"""tools/curate.py end to end on FineCap-mini shards (tools/make_synthetic_data.py) with
injected duplicates, broken samples and bad regions."""

import importlib.util
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_curation_boxes import reference_iou

from megatron_finevit.data.shards import ShardWriter, iter_shard, list_shards
from megatron_finevit.data.synthetic import make_sample

ROOT = Path(__file__).resolve().parents[2]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def jpeg(image, quality):
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def noise_image(width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def write_bad_json_shard(path):
    with tarfile.open(path, "w") as tar:
        for name, data in (("broken.jpg", jpeg(noise_image(300, 300, 9), 90)),
                           ("broken.json", b"{not json")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def area_fraction(box, meta):
    return (box[2] - box[0]) * (box[3] - box[1]) / (meta["width"] * meta["height"])


# Synthetic images are a few flat shapes on a plain background: their pHashes lie closer than
# photos' (distinct samples measured >= 4 bits apart), and their flat areas have almost no
# Laplacian response, so the test uses a dedup distance of 2 and leaves the photo quality rules
# to the real-photo tests.
OVERRIDES = ["min_short_side=200", "check_quality=false", "phash_max_distance=2",
             "keep_whole_below=3", "cap_per_class=8", "window_images=12", "num_visualized=4"]


def build_input(src):
    load_tool("make_synthetic_data").main(
        ["--out", str(src), "--num", "40", "--seed", "0", "--samples-per-shard", "16"])
    originals = [s for shard in list_shards(src) for s in iter_shard(shard)]
    expected_rule, injected_regions = {}, Counter()
    with ShardWriter(src, prefix="injected", max_samples_per_shard=100) as writer:
        for key, image_bytes, meta in originals[:5]:  # re-encoded copies
            writer.write(f"dup_{key}", jpeg(Image.open(io.BytesIO(image_bytes)), 40), meta)
            expected_rule[f"dup_{key}"] = "duplicate"
        key, image_bytes, meta = originals[5]
        writer.write("corrupt", b"\xff\xd8 not a jpeg", meta)
        writer.write("mismatch", image_bytes, {**meta, "width": meta["width"] + 1})
        writer.write("small", jpeg(noise_image(300, 150, 1), 90),
                     {"caption": "noise", "width": 300, "height": 150})
        writer.write("wide", jpeg(noise_image(1000, 300, 2), 90),
                     {"caption": "noise", "width": 1000, "height": 300})
        expected_rule.update(corrupt="corrupt_image", mismatch="meta_size_mismatch",
                             small="short_side", wide="aspect")
        for i in range(6):  # new images whose regions need curation
            image_bytes, meta = make_sample(seed=1, index=i)
            regions = list(meta["regions"])
            first = regions[0]["box"]
            regions += [
                {"box": [first[0] + 1, first[1], first[2] + 1, first[3]], "caption": "copy",
                 "label": "circle", "score": 0.9},  # IoU > 0.7 with a score-1.0 box
                {"box": [0, 0, meta["width"], meta["height"]], "caption": "the scene",
                 "label": "scene", "score": 0.1},
                {"box": [0, 0, 5, 5], "caption": "a speck", "label": "speck", "score": 0.9},
                {"box": [0, 0, meta["width"] // 2, meta["height"] // 2], "caption": "words",
                 "label": "text", "score": 0.9},
            ]
            injected_regions.update(nms=1, low_score=1, small_area=1, text_region=1)
            writer.write(f"regions_{i}", image_bytes, {**meta, "regions": regions})
            expected_rule[f"regions_{i}"] = None
    write_bad_json_shard(src / "zbad-000000.tar")
    inputs = originals + [s for s in iter_shard(src / "injected-000000.tar")]
    expected_rule.update({key: None for key, _, _ in originals})
    return inputs, expected_rule, injected_regions


def test_curate_tool_end_to_end(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    inputs, expected_rule, injected_regions = build_input(src)
    curate = load_tool("curate")
    args = [str(src), str(out), "--stage", "3", "--samples-per-shard", "10", "--no-progress",
            "--config", *OVERRIDES]
    assert curate.main(args) == 0

    report = json.loads((out / "curation_report.json").read_text())
    kept = [s for shard in list_shards(out) for s in iter_shard(shard)]
    in_meta = {key: meta for key, _, meta in inputs}

    # images: exactly the injected ones are rejected, each by its rule; counts add up
    assert [key for key, _, _ in kept] == [key for key, _, _ in inputs if not expected_rule[key]]
    images = report["images"]
    assert images["in"] == len(inputs) == 40 + 15
    assert images["kept"] == len(kept)
    assert images["kept"] + sum(images["rejected"].values()) == images["in"]
    want_rejected = Counter(rule for rule in expected_rule.values() if rule)
    assert {r: n for r, n in images["rejected"].items() if n} == dict(want_rejected)
    assert report["bad_samples"]["skipped_by_reason"] == {"invalid_json": 1}
    kept_bytes = {key: b for key, b, _ in kept}
    assert all(kept_bytes[key] == b for key, b, _ in inputs if key in kept_bytes)  # not re-encoded

    # regions: every kept region passes every rule (checked against brute-force references)
    for key, _, meta in kept:
        regions = meta["regions"]
        assert all(r in in_meta[key]["regions"] for r in regions)
        assert all(r["label"] != "text" and r["score"] >= 0.3 for r in regions)
        assert all(area_fraction(r["box"], meta) >= 0.01 for r in regions)
        assert all(reference_iou(a["box"], b["box"]) <= 0.7
                   for i, a in enumerate(regions) for b in regions[i + 1:])
        assert meta["ocr"] == in_meta[key]["ocr"]
    regions = report["regions"]
    assert regions["in"] == sum(len(in_meta[key]["regions"]) for key, _, _ in kept)
    assert regions["kept"] == sum(len(meta["regions"]) for _, _, meta in kept)
    assert regions["kept"] + sum(regions["dropped"].values()) == regions["in"]
    small_originals = sum(area_fraction(r["box"], in_meta[key]) < 0.01
                          for key, _, _ in kept for r in in_meta[key]["regions"]
                          if r["label"] != "text" and r["score"] >= 0.3)
    dropped = regions["dropped"]
    assert dropped["small_area"] == small_originals
    assert (dropped["nms"], dropped["low_score"], dropped["text_region"]) == (
        injected_regions["nms"], injected_regions["low_score"], injected_regions["text_region"])
    # class balance: at most cap_per_class=8 regions per class in every window of 12 kept images
    for start in range(0, len(kept), 12):
        per_class = Counter(r["label"] for _, _, m in kept[start:start + 12] for r in m["regions"])
        assert max(per_class.values()) <= 8
    assert dropped["class_balance"] > 0

    # reports and the picture
    assert "rejected by duplicate" in (out / "curation_report.txt").read_text()
    with Image.open(out / "regions.png") as png:
        png.verify()
    with Image.open(out / "regions.png") as png:
        assert png.format == "PNG" and png.width > 400 and png.height > 200

    # deterministic: a second run writes byte-identical shards and the same counts
    out2 = tmp_path / "out2"
    assert curate.main([str(src), str(out2), *args[2:]]) == 0
    for a, b in zip(list_shards(out), list_shards(out2), strict=True):
        assert a.read_bytes() == b.read_bytes()
    report2 = json.loads((out2 / "curation_report.json").read_text())
    assert {**report2, "seconds": 0} == {**report, "seconds": 0}
    assert curate.main(args) == 2  # never mixes with (or half-overwrites) an earlier output
