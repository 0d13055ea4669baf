"""Curator on real photos (quality + dedup), stage presets, config overrides, the PNG."""

import io

import numpy as np
import pytest
from curation_photos import photo
from PIL import Image, ImageEnhance, ImageFilter

from megatron_finevit.curation.config import CurationConfig, apply_overrides
from megatron_finevit.curation.pipeline import IMAGE_RULES, Curator, format_report
from megatron_finevit.curation.visualize import PALETTE, SampleReservoir, render_regions_png


def encode(image, quality=92):
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def sample(image, regions=(), quality=92):
    return encode(image, quality), {"caption": "c", "width": image.width, "height": image.height,
                                    "regions": list(regions), "ocr": []}


def test_curator_quality_and_dedup_on_real_photos():
    curator = Curator(CurationConfig.for_stage(3, min_short_side=224))
    names = ("astronaut", "coffee", "chelsea", "rocket")
    degraded = {
        "too_dark": lambda im: im.point(lambda x: round(x * 0.08)),
        "too_bright": lambda im: im.point(lambda x: round(255 - (255 - x) * 0.05)),
        "oversaturated": lambda im: ImageEnhance.Color(im).enhance(4.0),
        "blurry": lambda im: im.filter(ImageFilter.GaussianBlur(max(im.size) / 150)),
    }
    expected = []
    for name in names:
        for rule, degrade in degraded.items():  # degraded first: they must not enter the index
            if not (rule == "oversaturated" and name == "astronaut"):  # see quality tests
                expected.append((degrade(photo(name)), rule))
        expected.append((photo(name), None))
        half = photo(name).resize((photo(name).width // 2, photo(name).height // 2))
        expected.append((half.resize(photo(name).size), "duplicate"))  # soft copy, same size
    expected.append((photo("retina").crop((0, 0, 1411, 400)), "aspect"))  # 3.5 : 1
    expected.append((photo("camera").crop((0, 0, 200, 300)), "short_side"))
    for image, rule in expected:
        decision = curator(*sample(image, quality=70))
        assert decision.rejected_by == rule
    report = curator.report()
    assert report["images"]["in"] == len(expected)
    assert report["images"]["kept"] + sum(report["images"]["rejected"].values()) == len(expected)
    assert list(report["images"]["rejected"]) == list(IMAGE_RULES)
    assert "duplicate" in format_report(report)


def test_corrupt_and_mismatched_samples():
    curator = Curator(CurationConfig.for_stage(1))
    image_bytes, meta = sample(photo("coffee"))
    assert curator(b"not an image", meta).rejected_by == "corrupt_image"
    assert curator(image_bytes[: len(image_bytes) // 2], meta).rejected_by == "corrupt_image"
    assert curator(image_bytes, {**meta, "width": 601}).rejected_by == "meta_size_mismatch"
    assert curator(image_bytes, meta).kept


def test_stage_presets_follow_the_paper():
    for stage in (1, 2):
        cfg = CurationConfig.for_stage(stage)
        assert (cfg.min_short_side, cfg.dedup, cfg.check_aspect, cfg.check_quality,
                cfg.curate_regions) == (224, True, False, False, False)
    cfg = CurationConfig.for_stage(3)
    assert (cfg.min_short_side, cfg.min_aspect, cfg.max_aspect) == (448, 1 / 3, 3.0)
    assert (cfg.min_region_score, cfg.min_region_area, cfg.nms_iou) == (0.3, 0.01, 0.7)
    assert (cfg.keep_whole_below, cfg.cap_per_class, cfg.window_images) == (1000, 100_000, 10**7)
    # stage 1 keeps a blurry image and leaves its regions alone
    blurry = photo("astronaut").filter(ImageFilter.GaussianBlur(4))
    low = [{"box": [0, 0, 1, 1], "caption": "x", "label": "text", "score": 0.01}]
    stage1 = Curator(CurationConfig.for_stage(1))
    decision = stage1(*sample(blurry, low))
    assert decision.kept and decision.meta["regions"] == low
    assert (stage1.report()["regions"]["in"], stage1.report()["regions"]["kept"]) == (1, 1)
    with pytest.raises(ValueError, match="stage"):
        CurationConfig.for_stage(4)


def test_config_overrides_parse_and_validate():
    cfg = apply_overrides(CurationConfig.for_stage(3), [
        "min_short_side=336", "min_aspect=1/4", "check_quality=false", "nms_iou=1",
        "text_labels=text,sign"])
    assert (cfg.min_short_side, cfg.min_aspect, cfg.check_quality, cfg.nms_iou,
            cfg.text_labels) == (336, 0.25, False, 1.0, ("text", "sign"))
    assert isinstance(cfg.nms_iou, float)
    for bad, message in (("nosuch=1", "nosuch"), ("min_short_side=abc", "expected int"),
                         ("min_brightness=0.99", "min_brightness"), ("stage=1", "preset"),
                         ("min_short_side", "key=value")):
        with pytest.raises(ValueError, match=message):
            apply_overrides(CurationConfig(), [bad])


def test_reservoir_and_png_draw_boxes_where_the_regions_are(tmp_path):
    image = Image.new("RGB", (400, 300), (128, 128, 128))
    meta = {"caption": "a grey image with one region", "width": 400, "height": 300,
            "regions": [{"box": [100, 80, 300, 220], "caption": "a box", "label": "box"}],
            "ocr": []}
    reservoir = SampleReservoir(2, seed=0)
    reservoir.offer(image, {**meta, "regions": []})  # nothing to draw: not offered
    for _ in range(5):
        reservoir.offer(image, meta)
    assert len(reservoir.samples) == 2
    path = tmp_path / "regions.png"
    assert render_regions_png(reservoir.samples[:1], str(path), seed=0)
    with Image.open(path) as png:
        assert png.format == "PNG"
        sheet = np.asarray(png.convert("RGB"))
    gap = 10  # panels start at (gap, gap); the box outline is drawn 3 px wide from its corner
    assert tuple(sheet[gap + 150, gap + 100]) == PALETTE[0]  # left edge of the box
    assert tuple(sheet[gap + 150, gap + 200]) == (128, 128, 128)  # inside the box: untouched
    assert sheet.shape[0] > 300 + 2 * gap  # the caption strip is below the image
    assert not render_regions_png([], str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()


def test_reservoir_is_uniform():
    counts = np.zeros(10)
    for seed in range(300):
        reservoir = SampleReservoir(3, seed=seed)
        for i in range(10):
            reservoir.offer(Image.new("RGB", (8, 8)), {"regions": [{"box": [0, 0, 1, 1]}], "i": i})
        for s in reservoir.samples:
            counts[s.meta["i"]] += 1
    assert np.all(np.abs(counts / 300 - 0.3) < 0.09), counts  # each kept with prob 3/10
