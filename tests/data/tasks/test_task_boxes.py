"""Box serialisation: exact rounding at the edges and halves, degenerate boxes, round trips in
both coordinate systems, and clear errors for malformed text."""

import itertools
from fractions import Fraction

import pytest

from megatron_finevit.data.tasks.boxes import (ABSOLUTE, RELATIVE, BoxCodec, BoxParseError,
                                               round_half_up_scaled)

RELATIVE_CODEC, ABSOLUTE_CODEC = BoxCodec(RELATIVE), BoxCodec(ABSOLUTE)
ORIGINAL_HW, RESIZED_HW = (300, 2000), (168, 1120)  # (height, width): smart_resize of 300×2000


def test_relative_edges_halves_and_degenerate_boxes():
    # The whole image is [0, 0, 1000, 1000]; a half rounds up (1 px of 2000 = 0.5 -> 1, 3 -> 2).
    assert RELATIVE_CODEC.encode([0, 0, 2000, 300], ORIGINAL_HW, RESIZED_HW) == (0, 0, 1000, 1000)
    assert RELATIVE_CODEC.encode([1, 0.75, 3, 2.25], ORIGINAL_HW, RESIZED_HW) == (1, 3, 2, 8)
    # Exact for the float given: 0.15 is stored as 0.1499999..., just below the half.
    assert RELATIVE_CODEC.encode([0, 0.15, 1, 1], ORIGINAL_HW, RESIZED_HW)[1] == 0
    assert RELATIVE_CODEC.encode([0.999, 0, 1.001, 0.1], ORIGINAL_HW, RESIZED_HW) == (0, 0, 1, 0)
    # Degenerate: x1 == x2 in the shard, or a box thinner than half a unit.
    assert RELATIVE_CODEC.encode([500, 30, 500, 60], ORIGINAL_HW, RESIZED_HW) == (250, 100, 250,
                                                                                   200)
    assert RELATIVE_CODEC.encode([600, 30, 600.4, 60], ORIGINAL_HW, RESIZED_HW)[::2] == (300, 300)
    # Outside the image (validation drops those; the clamp keeps the bound anyway).
    assert RELATIVE_CODEC.encode([-5, -1, 2100, 301], ORIGINAL_HW, RESIZED_HW) == (0, 0, 1000, 1000)


def test_relative_equals_brute_force_rounding():
    """Against a brute-force oracle: the nearest integer by exhaustive search (ties upward)."""
    for width, x in itertools.product((7, 640, 999, 1001, 2000), (0, 0.5, 1, 3.5, 6.999, 7)):
        exact = Fraction(x) * 1000 / width
        nearest = min(range(0, 1001), key=lambda v: (abs(v - exact), -v))
        assert round_half_up_scaled(x, 1000, width) == nearest, (width, x)


def test_absolute_is_resized_pixels():
    # 2000 px wide original -> 1120 px resized: x scales by 0.56, y by 168/300 = 0.56.
    assert ABSOLUTE_CODEC.encode([0, 0, 2000, 300], ORIGINAL_HW, RESIZED_HW) == (0, 0, 1120, 168)
    assert ABSOLUTE_CODEC.encode([100, 50, 1001, 250], ORIGINAL_HW, RESIZED_HW) == (56, 28, 561,
                                                                                    140)
    assert ABSOLUTE_CODEC.to_pixels((56, 28, 561, 140), RESIZED_HW) == (56, 28, 561, 140)


@pytest.mark.parametrize("codec", [RELATIVE_CODEC, ABSOLUTE_CODEC], ids=lambda c: c.coords)
def test_round_trip(codec):
    sx, sy = codec.scale(RESIZED_HW)
    boxes = [(0, 0, sx, sy), (0, 0, 0, 0), (sx, sy, sx, sy), (5, 7, 5, 9), (1, 2, 3, 4),
             (sx - 1, 0, sx, sy)]
    for box in boxes:
        text = codec.format(box)
        assert codec.parse(text, RESIZED_HW) == box
        assert codec.parse(f"  {text.replace(', ', ',')}\n", RESIZED_HW) == box
    assert BoxCodec.format((1, 2, 3, 4)) == "[1, 2, 3, 4]"
    # shard pixels -> integers -> resized pixels: off by at most half a unit per coordinate
    height, width = ORIGINAL_HW
    for box in ([0, 0, width, height], [13.3, 7.7, 1500.2, 299.9], [42, 42, 42, 42]):
        pixels = codec.to_pixels(codec.encode(box, ORIGINAL_HW, RESIZED_HW), RESIZED_HW)
        unit = (RESIZED_HW[1] / sx, RESIZED_HW[0] / sy)
        for i, (got, want) in enumerate(zip(pixels, box)):
            scale = RESIZED_HW[1 - i % 2] / ORIGINAL_HW[1 - i % 2]
            assert abs(got - want * scale) <= unit[i % 2] / 2 + 1e-9


@pytest.mark.parametrize("text, message", [
    ("", "not a box"), ("[1, 2, 3]", "not a box"), ("[1, 2, 3, 4, 5]", "not a box"),
    ("(1,2),(3,4)", "not a box"), ("[1, -2, 3, 4]", "not a box"), ("[1.5, 2, 3, 4]", "not a box"),
    ("[1, 2, 3, 4] and more", "not a box"), ("[a, b, c, d]", "not a box"),
    ("[١, 2, 3, 4]", "not a box"),  # a non-ASCII digit
    ("[0, 0, 1001, 10]", r"x2=1001 outside \[0, 1000\]"),
    ("[5, 0, 4, 10]", "inverted"), ("[0, 9, 4, 8]", "inverted"),
])
def test_malformed_text_is_refused(text, message):
    with pytest.raises(BoxParseError, match=message):
        RELATIVE_CODEC.parse(text, RESIZED_HW)


def test_absolute_bounds_follow_the_resized_image():
    assert ABSOLUTE_CODEC.parse("[0, 0, 1120, 168]", RESIZED_HW) == (0, 0, 1120, 168)
    with pytest.raises(BoxParseError, match=r"y2=169 outside \[0, 168\]"):
        ABSOLUTE_CODEC.parse("[0, 0, 1120, 169]", RESIZED_HW)
    with pytest.raises(ValueError, match="box coords"):
        BoxCodec("normalized")
