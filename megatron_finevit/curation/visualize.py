"""A PNG of kept regions drawn with their captions on their images (like the paper's Fig. 11).

Each panel shows one kept image with a random subset of its regions: a coloured box per region
with its caption in a box of the same colour, OCR boxes in white with their text, and the global
caption in a white box below the image. Panels are laid out two per row.
"""

from __future__ import annotations

import random
import textwrap
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

PANEL_MAX_SIDE = 640
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))


@dataclass
class _Sample:
    image: Image.Image  # downscaled to PANEL_MAX_SIDE
    meta: dict
    scale: float  # panel pixels per original pixel


class SampleReservoir:
    """Uniform random sample of `k` kept samples that have regions (reservoir sampling), with
    images downscaled on entry so memory stays at k small images."""

    def __init__(self, k: int, seed: int = 0):
        self.k = k
        self._rng = random.Random(seed)
        self._seen = 0
        self.samples: list[_Sample] = []

    def offer(self, image: Image.Image, meta: dict) -> None:
        if self.k == 0 or not (meta.get("regions") or meta.get("ocr")):
            return
        self._seen += 1
        slot = len(self.samples) if len(self.samples) < self.k else self._rng.randrange(self._seen)
        if slot < self.k:
            scale = min(1.0, PANEL_MAX_SIDE / max(image.size))
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            sample = _Sample(image.convert("RGB").resize(size, Image.BILINEAR), meta, scale)
            if slot == len(self.samples):
                self.samples.append(sample)
            else:
                self.samples[slot] = sample


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour, font,
           size: tuple[int, int]) -> None:
    """Caption in a filled box whose top-left is at `xy`, kept inside an image of `size`."""
    text = textwrap.shorten(text, width=60, placeholder="…")
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = min(max(0.0, xy[0]), max(0.0, size[0] - (right - left) - 4))
    y = min(max(0.0, xy[1]), max(0.0, size[1] - (bottom - top) - 4))
    draw.rectangle([x, y, x + right - left + 4, y + bottom - top + 4], fill=colour)
    ink = (0, 0, 0) if sum(colour) > 3 * 140 else (255, 255, 255)
    draw.text((x + 2 - left, y + 2 - top), text, font=font, fill=ink)


def draw_panel(sample: _Sample, max_regions: int, rng: random.Random) -> Image.Image:
    """One annotated image with its global caption underneath."""
    image = sample.image.copy()
    draw = ImageDraw.Draw(image)
    font = _font(13)
    regions = list(sample.meta.get("regions", []))
    if len(regions) > max_regions:
        regions = rng.sample(regions, max_regions)
    # (box, caption, colour, label above the box?) -- OCR labels go below, off the text they read
    entries = [(r["box"], r.get("caption", ""), PALETTE[i % len(PALETTE)], True)
               for i, r in enumerate(regions)]
    entries += [(o["box"], f'OCR: {o["text"]}', (255, 255, 255), False)
                for o in sample.meta.get("ocr", [])]
    for box, _, colour, _ in entries:
        draw.rectangle([v * sample.scale for v in box], outline=colour, width=3)
    for box, caption, colour, above in entries:  # labels after all boxes: no box covers a label
        y = box[1] * sample.scale - 18 if above else box[3] * sample.scale + 2
        _label(draw, (box[0] * sample.scale, y), caption, colour, font, image.size)

    caption_font = _font(14)
    lines = textwrap.wrap(sample.meta.get("caption", ""), width=max(20, image.width // 8))[:6]
    line_height = 18
    panel = Image.new("RGB", (image.width, image.height + line_height * len(lines) + 10),
                      (255, 255, 255))
    panel.paste(image, (0, 0))
    text_draw = ImageDraw.Draw(panel)
    for i, line in enumerate(lines):
        text_draw.text((5, image.height + 5 + i * line_height), line, font=caption_font,
                       fill=(0, 0, 0))
    return panel


def render_regions_png(samples: list[_Sample], path: str, max_regions: int = 8,
                       seed: int = 0, columns: int = 2) -> bool:
    """Draw `samples` into one PNG at `path`. Returns False (and writes nothing) if empty."""
    if not samples:
        return False
    rng = random.Random(seed)
    panels = [draw_panel(s, max_regions, rng) for s in samples]
    columns = min(columns, len(panels))
    rows = [panels[i:i + columns] for i in range(0, len(panels), columns)]
    gap = 10
    width = max(sum(p.width for p in row) + gap * (len(row) + 1) for row in rows)
    height = sum(max(p.height for p in row) for row in rows) + gap * (len(rows) + 1)
    sheet = Image.new("RGB", (width, height), (40, 40, 40))
    y = gap
    for row in rows:
        x = gap
        for panel in row:
            sheet.paste(panel, (x, y))
            x += panel.width + gap
        y += max(p.height for p in row) + gap
    sheet.save(path, format="PNG")
    return True
