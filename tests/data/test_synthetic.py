"""FineCap-mini generator (determinism, ground truth visible in pixels) and the JSONL importer."""

import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from megatron_finevit.data.bad_samples import BadSampleCounter
from megatron_finevit.data.jsonl_import import import_jsonl
from megatron_finevit.data.shards import iter_shard, list_shards
from megatron_finevit.data.synthetic import COLORS, make_sample, make_synthetic_shards

REPO = Path(__file__).resolve().parents[2]


def test_cli_same_seed_identical_bytes_other_seed_differs(tmp_path):
    def run(out, seed):
        subprocess.run([sys.executable, str(REPO / "tools/make_synthetic_data.py"), "--out",
                        str(tmp_path / out), "--num", "10", "--seed", str(seed),
                        "--samples-per-shard", "4"], check=True, capture_output=True)
        return [p.read_bytes() for p in list_shards(tmp_path / out)]
    first, again, other = run("a", 3), run("b", 3), run("c", 4)
    assert len(first) == 3 and first == again
    assert all(x != y for x, y in zip(first, other))


def test_ground_truth_matches_pixels():
    """Every region's centre pixel has its named colour; every caption names every object."""
    sizes = set()
    for index in range(30):
        image_bytes, meta = make_sample(seed=0, index=index)
        image = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB")).astype(int)
        assert image.shape[:2] == (meta["height"], meta["width"])
        sizes.add((meta["height"], meta["width"]))
        assert 1 / 3 <= meta["width"] / meta["height"] <= 3
        for region in meta["regions"]:
            x1, y1, x2, y2 = region["box"]
            color = region["caption"].split()[1]
            # A triangle's centroid lies at 2/3 of its height; circles/squares at the centre.
            cy = (y1 + 2 * y2) // 3 if region["label"] == "triangle" else (y1 + y2) // 2
            assert np.abs(image[cy, (x1 + x2) // 2] - COLORS[color]).max() < 40, (index, region)
            assert region["caption"] in meta["caption"]
        for entry in meta["ocr"]:
            x1, y1, x2, y2 = entry["box"]
            crop = image[y1:y2, x1:x2]
            assert crop.std() > 20  # glyph ink inside the OCR box
            assert f'"{entry["text"]}"' in meta["caption"]
    assert len(sizes) == 30  # varied sizes


def test_importer_converts_and_skips(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (300, 200), "red").save(images / "a.jpg")
    Image.new("RGB", (120, 160), "blue").save(images / "b.png")
    Image.new("RGB", (50, 50), "blue").save(images / "c.bmp")
    (images / "broken.jpg").write_bytes(b"not an image")
    lines = [
        json.dumps({"image": "a.jpg", "caption": "a red picture",
                    "regions": [{"box": [0, 0, 10, 10], "caption": "corner", "label": "x",
                                 "score": 0.9}, {"box": [0, 0, 999, 10], "caption": "too wide",
                                                 "label": "x", "score": 0.9}]}),
        json.dumps({"image": "b.png", "caption": "blue",
                    "ocr": [{"box": [1, 1, 5, 5], "text": "B"}]}),
        "{broken json",
        json.dumps({"image": "missing.jpg", "caption": "x"}),
        json.dumps({"image": "../outside.jpg", "caption": "x"}),
        json.dumps({"image": "c.bmp", "caption": "x"}),
        json.dumps({"image": "broken.jpg", "caption": "x"}),
        "",
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    counter = BadSampleCounter(min_samples=10_000)
    shards = import_jsonl(images, manifest, tmp_path / "out", counter=counter)
    samples = [s for p in shards for s in iter_shard(p)]
    assert [m["caption"] for _, _, m in samples] == ["a red picture", "blue"]
    assert samples[0][1] == (images / "a.jpg").read_bytes()  # stored unchanged
    assert (samples[0][2]["width"], samples[0][2]["height"]) == (300, 200)
    assert [r["caption"] for r in samples[0][2]["regions"]] == ["corner"]
    assert samples[1][2]["ocr"] == [{"box": [1, 1, 5, 5], "text": "B"}]
    assert counter.skipped == {"invalid_json": 1, "missing_image": 1, "unsafe_path": 1,
                               "unsupported_format": 1, "corrupt_image": 1, "non_utf8": 1}
    assert counter.dropped == {"box_outside": 1}


def test_library_entry_point_matches_cli_layout(tmp_path):
    shards = make_synthetic_shards(tmp_path, num=5, seed=1, samples_per_shard=2, progress=False)
    assert [p.name for p in shards] == [f"finecap-mini-00000{i}.tar" for i in range(3)]
    keys = [k for p in shards for k, _, _ in iter_shard(p)]
    assert keys == [f"{i:08d}" for i in range(5)]


def test_scene_spec_square_images_with_large_shapes(tmp_path):
    """The quick start's grounding set: fixed square images, at most two shapes of 30-60% of
    the side (their centre pixels still show the named colour), at most one word; the CLI flags
    reach it and reject an impossible scene."""
    from megatron_finevit.data.synthetic import SceneSpec

    spec = SceneSpec(square_size=224, shape_scale=(0.3, 0.6), max_shapes=2, max_words=1)
    for index in range(20):
        image_bytes, meta = make_sample(seed=5, index=index, spec=spec)
        image = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB")).astype(int)
        assert image.shape[:2] == (224, 224) == (meta["height"], meta["width"])
        assert 1 <= len(meta["regions"]) <= 2 and len(meta["ocr"]) <= 1
        for region in meta["regions"]:
            x1, y1, x2, y2 = region["box"]
            assert 0.3 * 224 - 1 <= x2 - x1 <= 0.6 * 224
            colour = region["caption"].split()[1]
            assert np.abs(image[(y1 + y2) // 2, (x1 + x2) // 2] - COLORS[colour]).max() < 40
    assert make_sample(seed=5, index=0) != make_sample(seed=5, index=0, spec=spec)
    run = [sys.executable, str(REPO / "tools/make_synthetic_data.py"), "--out", str(tmp_path / "s"),
           "--num", "3", "--square-size", "224", "--shape-scale", "0.3", "0.6", "--max-shapes", "2"]
    subprocess.run(run, check=True, capture_output=True)
    shard_meta = [m for _, _, m in iter_shard(list_shards(tmp_path / "s")[0])]
    assert [(m["height"], m["width"]) for m in shard_meta] == [(224, 224)] * 3
    bad = subprocess.run(run[:-4] + ["0.7", "0.2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid scene" in bad.stderr


def test_grid_cell_puts_every_shape_box_on_the_grid(tmp_path):
    """``grid_cell``: shape sides whole cells (1 or 2 of 56 px for 30-60% of 224), corners on
    cell boundaries, no two shapes overlapping, the named colour at each centre; words stay
    free; the CLI flag reaches it and rejects a cell below one pixel."""
    from megatron_finevit.data.synthetic import SceneSpec

    spec = SceneSpec(square_size=224, shape_scale=(0.3, 0.6), max_shapes=2, max_words=1,
                     grid_cell=56)
    sides = set()
    for index in range(40):
        image_bytes, meta = make_sample(seed=7, index=index, spec=spec)
        image = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB")).astype(int)
        boxes = [region["box"] for region in meta["regions"]]
        for region, (x1, y1, x2, y2) in zip(meta["regions"], boxes):
            assert all(v % 56 == 0 for v in (x1, y1, x2, y2)) and x2 - x1 == y2 - y1
            sides.add((x2 - x1) // 56)
            colour = region["caption"].split()[1]
            cy = (y1 + 2 * y2) // 3 if region["label"] == "triangle" else (y1 + y2) // 2
            assert np.abs(image[cy, (x1 + x2) // 2] - COLORS[colour]).max() < 40
        if len(boxes) == 2:
            (a, b) = boxes
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    assert sides == {1, 2}
    unsnapped = make_sample(seed=7, index=0, spec=dataclasses.replace(spec, grid_cell=None))[1]
    assert any(v % 56 for region in unsnapped["regions"] for v in region["box"])
    run = [sys.executable, str(REPO / "tools/make_synthetic_data.py"), "--out", str(tmp_path / "g"),
           "--num", "2", "--square-size", "224", "--shape-scale", "0.3", "0.6", "--grid-cell"]
    subprocess.run(run + ["56"], check=True, capture_output=True)
    assert all(v % 56 == 0 for _, _, m in iter_shard(list_shards(tmp_path / "g")[0])
               for region in m["regions"] for v in region["box"])
    bad = subprocess.run(run + ["0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid scene" in bad.stderr
