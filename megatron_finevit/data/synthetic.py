"""FineCap-mini: a synthetic, fully labelled stand-in for the FineCap data (no download needed).

Each image has a random size (short side 200..600 px, long side up to 900 px, aspect in [1, 3],
either orientation) and holds 1..4 non-overlapping coloured shapes (circle / square / triangle in
eight named colours) and 0..2 rendered words (Pillow's built-in FreeType font). The ground truth is
known by construction, so later stages can measure what the model learnt:

- global caption naming every object and its position on a 3×3 grid
  ("a red circle at the top left, a blue square in the center and the text "DELTA" at the bottom");
- one region per shape: exact box, caption "a red circle", label "circle", score 1.0;
- one OCR entry per word: the box of the rendered glyphs and the string.

Every sample is generated from its own RNG seeded by (seed, sample index), so the same seed gives
byte-identical shards and any sample can be regenerated on its own. ``SceneSpec`` varies the
scene (fixed square images, fewer and larger shapes) for the quick start's grounding demo.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from megatron_finevit.data.shards import ShardWriter

COLORS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220), "yellow": (235, 210, 20),
    "purple": (130, 40, 170), "orange": (245, 130, 20), "black": (15, 15, 15),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle")
WORDS = ("ALPHA", "DELTA", "OMEGA", "SIGMA", "RIVER", "STONE", "CLOUD", "EXIT", "OPEN", "SALE",
         "NORTH", "TRAIN", "PIXEL", "LIGHT", "ZONE", "CAFE", "HOTEL", "PARK", "STOP", "MAPLE")
_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "center", "right")


def grid_position(box: list[float], width: int, height: int) -> str:
    """Name of the 3×3 grid cell holding the box centre: "top left", "center", "bottom" ..."""
    row = _ROWS[min(2, int(3 * (box[1] + box[3]) / 2 / height))]
    col = _COLS[min(2, int(3 * (box[0] + box[2]) / 2 / width))]
    if row == "middle":
        return "center" if col == "center" else col
    return row if col == "center" else f"{row} {col}"


def _phrase_with_position(phrase: str, position: str) -> str:
    if position == "center":
        return f"{phrase} in the center"
    return f"{phrase} {'on' if position in ('left', 'right') else 'at'} the {position}"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """What a sample may hold. The default is FineCap-mini; ``square_size`` (every image
    ``square_size``² pixels) with fewer, larger shapes makes a grounding set a tiny CPU model
    can learn in minutes (the quick start's Stage III)."""

    square_size: int | None = None        # None: short side 200..600, aspect 1..3
    shape_scale: tuple[float, float] = (0.15, 0.35)  # shape side over the short side
    max_shapes: int = 4
    max_words: int = 2
    # None: shapes anywhere. N: shapes on a grid of N-pixel cells — each side rounded to a whole
    # number of cells (at least one), each corner on a cell boundary, so every shape's box edge
    # is a grid line (words stay free)
    grid_cell: int | None = None

    def __post_init__(self):
        low, high = self.shape_scale
        if (not 0 < low <= high < 1 or self.max_shapes < 1 or self.max_words < 0
                or (self.grid_cell is not None and self.grid_cell < 1)):
            raise ValueError(f"invalid scene: {self}")
        if self.square_size is not None and self.square_size < 56:
            raise ValueError(f"square_size={self.square_size} must be >= 56")


def _image_size(rng: np.random.Generator, spec: SceneSpec) -> tuple[int, int]:
    if spec.square_size is not None:
        return spec.square_size, spec.square_size
    short = int(rng.integers(200, 601))
    long = min(900, int(round(short * rng.uniform(1.0, 3.0))))
    return (short, long) if rng.random() < 0.5 else (long, short)  # (height, width)


def _overlaps(box, boxes, margin=4) -> bool:
    return any(box[0] < b[2] + margin and b[0] < box[2] + margin and box[1] < b[3] + margin
               and b[1] < box[3] + margin for b in boxes)


def _place(rng, w, h, bw, bh, boxes, tries=50):
    """Random box of size bw×bh inside the image not overlapping `boxes`, or None."""
    if bw >= w or bh >= h:
        return None
    for _ in range(tries):
        x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        box = [x, y, x + bw, y + bh]
        if not _overlaps(box, boxes):
            return box
    return None


def _place_on_grid(rng, w, h, side, cell, boxes, tries=50):
    """Random square box on the grid of ``cell``-pixel cells, its side ``side`` rounded to whole
    cells (at least one), not overlapping `boxes` (touching allowed: neighbouring cells), or None."""
    side = max(1, int(round(side / cell))) * cell
    if side >= w or side >= h:
        return None
    for _ in range(tries):
        x = int(rng.integers(0, (w - side) // cell + 1)) * cell
        y = int(rng.integers(0, (h - side) // cell + 1)) * cell
        box = [x, y, x + side, y + side]
        if not _overlaps(box, boxes, margin=0):
            return box
    return None


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: list[int], rgb) -> None:
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=rgb)
    elif shape == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=rgb)
    else:  # triangle pointing up, touching the box on three sides
        draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=rgb)


def make_sample(seed: int, index: int, spec: SceneSpec = SceneSpec()) -> tuple[bytes, dict]:
    """One synthetic sample: (JPEG bytes, metadata in the shard JSON schema)."""
    rng = np.random.default_rng([seed, index])
    height, width = _image_size(rng, spec)
    # Mid grey-ish background: every named colour (white and black included) stands out.
    background = tuple(int(v) for v in rng.integers(110, 190, size=3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    boxes, regions, ocr, phrases = [], [], [], []

    for _ in range(int(rng.integers(1, spec.max_shapes + 1))):
        side = int(rng.uniform(*spec.shape_scale) * short)
        box = (_place(rng, width, height, side, side, boxes) if spec.grid_cell is None
               else _place_on_grid(rng, width, height, side, spec.grid_cell, boxes))
        if box is None:
            continue
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        _draw_shape(draw, shape, box, COLORS[color])
        boxes.append(box)
        phrase = f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"
        regions.append({"box": box, "caption": phrase, "label": shape, "score": 1.0})
        phrases.append(_phrase_with_position(phrase, grid_position(box, width, height)))

    for _ in range(int(rng.integers(0, spec.max_words + 1))):
        word = WORDS[int(rng.integers(len(WORDS)))]
        font = ImageFont.load_default(size=int(rng.integers(18, 40)))
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
        box = _place(rng, width, height, right - left, bottom - top, boxes)
        if box is None:
            continue
        ink = (0, 0, 0) if sum(background) > 3 * 128 else (255, 255, 255)
        draw.text((box[0] - left, box[1] - top), word, font=font, fill=ink)
        boxes.append(box)
        ocr.append({"box": box, "text": word})
        position = grid_position(box, width, height)
        phrases.append(_phrase_with_position(f'the text "{word}"', position))

    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    meta = {"caption": _join(phrases) + "." if phrases else "an empty background.",
            "width": width, "height": height, "regions": regions, "ocr": ocr,
            "source": f"finecap-mini seed={seed} index={index}"}
    return buf.getvalue(), meta


def make_synthetic_shards(out_dir: str | Path, num: int, seed: int = 0,
                          samples_per_shard: int = 256, prefix: str = "finecap-mini",
                          progress: bool = True, spec: SceneSpec = SceneSpec()) -> list[Path]:
    """Write `num` samples as shards in `out_dir`; returns the shard paths."""
    with ShardWriter(out_dir, prefix=prefix, max_samples_per_shard=samples_per_shard) as writer:
        for index in tqdm(range(num), desc="synthetic samples", unit="img", disable=not progress):
            image_bytes, meta = make_sample(seed, index, spec)
            writer.write(f"{index:08d}", image_bytes, meta)
    return writer.written_shards
