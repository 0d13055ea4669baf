"""Box serialisation and parsing for region QA: one coordinate system, one text form, both ways.

Boxes are ``[x1, y1, x2, y2]`` (left, top, right, bottom; origin top-left; ``x1 <= x2``,
``y1 <= y2``) in one of two integer coordinate systems, chosen in config (``BoxCodec.coords``):

* ``"relative"`` (default, Qwen3-VL's convention): integers 0..1000 over the image's width and
  height. They do not depend on the resize: ``smart_resize`` stretches the whole image, so a
  point at fraction ``x / W`` of the original is at the same fraction of the resized image.
* ``"absolute"`` (Qwen2.5-VL's convention): integer pixels of the *resized* image (the
  ``smart_resize`` size the model sees), 0..W' and 0..H'.

Conversion from the shard's boxes (pixels of the original ``H × W`` image, floats allowed) uses
one rule for both systems, in exact rational arithmetic (no float rounding surprises):

    v = floor(x · S / W + 1/2), then clamped to [0, S]

with ``S = 1000`` (relative) or ``S = W'`` (absolute), and the same with ``y``, ``H`` (and ``H'``)
for vertical coordinates. It is exact for the value stored (a JSON float such as 0.15 is
0.1499999… and rounds as such), so every process gets the same integers. Halves round up
(``0.5 → 1``, ``1.5 → 2``: not banker's rounding); the edges map exactly (``0 → 0``,
``W → S``); the clamp only matters for boxes outside the image, which shard validation already
drops. A box narrower than ``W / (2S)`` may round to a degenerate
box (``x1 == x2``): it is kept, serialised and parsed like any other.

Text form: ``[x1, y1, x2, y2]`` — a JSON list, the spelling of Qwen2.5-VL / Qwen3-VL's
``bbox_2d`` grounding answers. Qwen3-VL dropped Qwen2-VL's ``<|box_start|>(x1,y1),(x2,y2)
<|box_end|>`` special tokens for plain text, so grounding data and evaluation in Qwen3-VL's
format read the same way. Cost with Qwen's tokenizer (one token per digit): ``[0, 0, 1000,
1000]`` is 18 tokens, the ``<|box_start|>`` form 17, the compact ``[0,0,1000,1000]`` 15;
the 1–3 tokens saved are not worth a format nothing else uses.

``BoxCodec.parse`` accepts exactly what ``BoxCodec.format`` emits (any whitespace around the
numbers) and raises ``BoxParseError`` (a ValueError) naming what is wrong otherwise: not four
non-negative integers in brackets, a coordinate above the bound, or an inverted box. Evaluation
(grounding IoU) uses it to read the model's answers and ``to_pixels`` to compare them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction
from typing import Sequence

RELATIVE, ABSOLUTE = "relative", "absolute"
RELATIVE_SCALE = 1000

Box = tuple[int, int, int, int]

_BOX_TEXT = re.compile(r"\s*\[\s*([0-9]+)\s*,\s*([0-9]+)\s*,\s*([0-9]+)\s*,\s*([0-9]+)\s*\]\s*")


class BoxParseError(ValueError):
    """Text that is not a box of the codec's coordinate system."""


def round_half_up_scaled(value: float, scale: int, extent: int) -> int:
    """``floor(value · scale / extent + 1/2)`` clamped to ``[0, scale]``, computed exactly."""
    if extent <= 0:
        raise ValueError(f"image extent must be positive, got {extent}")
    if not math.isfinite(value):
        raise ValueError(f"box coordinate {value!r} is not finite")
    scaled = Fraction(value) * scale / extent + Fraction(1, 2)
    return min(max(math.floor(scaled), 0), scale)


@dataclasses.dataclass(frozen=True)
class BoxCodec:
    """Boxes in one coordinate system: shard pixels -> integers -> text -> integers -> pixels.

    Sizes are ``(height, width)`` pairs like the rest of the data pipeline (``smart_resize``).
    """

    coords: str = RELATIVE

    def __post_init__(self):
        if self.coords not in (RELATIVE, ABSOLUTE):
            raise ValueError(f"box coords must be {RELATIVE!r} or {ABSOLUTE!r}, "
                             f"got {self.coords!r}")

    def scale(self, resized_hw: tuple[int, int]) -> tuple[int, int]:
        """Largest ``(x, y)`` value of this system for an image resized to ``resized_hw``."""
        if self.coords == RELATIVE:
            return RELATIVE_SCALE, RELATIVE_SCALE
        return int(resized_hw[1]), int(resized_hw[0])

    def encode(self, box: Sequence[float], original_hw: tuple[int, int],
               resized_hw: tuple[int, int]) -> Box:
        """A shard box (pixels of the original image) -> integers of this system."""
        if len(box) != 4:
            raise ValueError(f"a box has 4 coordinates, got {list(box)}")
        (height, width), (sx, sy) = original_hw, self.scale(resized_hw)
        x1, y1, x2, y2 = box
        return (round_half_up_scaled(x1, sx, width), round_half_up_scaled(y1, sy, height),
                round_half_up_scaled(x2, sx, width), round_half_up_scaled(y2, sy, height))

    @staticmethod
    def format(box: Box) -> str:
        """``[x1, y1, x2, y2]``."""
        return "[" + ", ".join(str(int(v)) for v in box) + "]"

    def parse(self, text: str, resized_hw: tuple[int, int]) -> Box:
        """The box ``text`` holds; raises ``BoxParseError`` for anything ``format`` would not
        write for an image resized to ``resized_hw``."""
        match = _BOX_TEXT.fullmatch(text)
        if match is None:
            raise BoxParseError(f"not a box: expected '[x1, y1, x2, y2]' with non-negative "
                                f"integers, got {text!r}")
        box = tuple(int(v) for v in match.groups())
        sx, sy = self.scale(resized_hw)
        for name, value, bound in zip(("x1", "y1", "x2", "y2"), box, (sx, sy, sx, sy)):
            if value > bound:
                raise BoxParseError(f"{name}={value} outside [0, {bound}] ({self.coords} "
                                    f"coordinates) in {text!r}")
        if box[2] < box[0] or box[3] < box[1]:
            raise BoxParseError(f"inverted box {text!r}: need x1 <= x2 and y1 <= y2")
        return box

    def to_pixels(self, box: Box, resized_hw: tuple[int, int]) -> tuple[float, ...]:
        """Integers of this system -> pixels of the resized image (floats)."""
        (height, width), (sx, sy) = resized_hw, self.scale(resized_hw)
        x1, y1, x2, y2 = box
        return (x1 * width / sx, y1 * height / sy, x2 * width / sx, y2 * height / sy)
