"""smart_resize: properties over many sizes, and equality with a high-precision float oracle."""

"""smart_resize: properties over many sizes, and equality with a brute-force exact oracle."""

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_finevit.data.bad_samples import BadSampleError
from megatron_finevit.data.resize import ResizePolicy, num_patches, smart_resize


def qwen2vl_rule_bruteforce(h, w, factor, min_pixels, max_pixels):
    """The Qwen2-VL rule stated literally and searched by brute force with exact rationals:
    round each side to the nearest multiple (half up); if the area is above max, each side is the
    largest multiple k·f with k·f <= side·sqrt(max/(h·w)); if below min, the smallest with
    k·f >= side·sqrt(min/(h·w)). Squared comparisons of Fractions: no rounding anywhere."""
    h_bar = max(factor, math.floor(Fraction(h, factor) + Fraction(1, 2)) * factor)
    w_bar = max(factor, math.floor(Fraction(w, factor) + Fraction(1, 2)) * factor)
    if h_bar * w_bar > max_pixels:
        scale2 = Fraction(max_pixels, h * w)

        def side(s):
            k = 1
            while Fraction(((k + 1) * factor) ** 2, s * s) <= scale2:
                k += 1
            return k * factor
        return side(h), side(w)
    if h_bar * w_bar < min_pixels:
        scale2 = Fraction(min_pixels, h * w)

        def side(s):
            k = 1
            while Fraction((k * factor) ** 2, s * s) < scale2:
                k += 1
            return k * factor
        return side(h), side(w)
    return h_bar, w_bar


def sizes(max_aspect=3.0):
    """(h, w) with sides 2..8000 and aspect within `max_aspect`."""
    return st.integers(2, 8000).flatmap(lambda h: st.tuples(
        st.just(h), st.integers(max(2, math.ceil(h / max_aspect)), int(h * max_aspect))))


POLICIES = st.sampled_from([
    ResizePolicy(),
    ResizePolicy(max_pixels=256 * 256),
    ResizePolicy(max_pixels=448 * 448, min_pixels=112 * 112),
    ResizePolicy(factor=14, max_pixels=336 * 336, min_pixels=28 * 28),
])


@settings(max_examples=400, deadline=None, database=None)
@given(hw=sizes(), policy=POLICIES)
def test_properties(hw, policy):
    h, w = hw
    th, tw = policy.target_size(h, w)
    f = policy.factor
    assert th % f == 0 and tw % f == 0 and th >= f and tw >= f
    assert policy.min_pixels <= th * tw <= policy.max_pixels
    # Each side is within one factor of a common scaling of the input (see module docstring),
    # so the true aspect lies in this interval (upper bound open when a side is one factor).
    assert (th - f) / (tw + f) <= h / w
    if tw > f:
        assert h / w <= (th + f) / (tw - f)
    p = policy.patch_size
    assert num_patches(th, tw, p) == (th // p) * (tw // p)


@settings(max_examples=400, deadline=None, database=None)
@given(hw=sizes(), policy=POLICIES)
def test_equals_bruteforce_oracle(hw, policy):
    assert policy.target_size(*hw) == qwen2vl_rule_bruteforce(*hw, policy.factor, policy.min_pixels,
                                                           policy.max_pixels)


def test_exact_boundaries():
    """Scaled sides that land exactly on a multiple of the factor must not lose a row to float
    rounding (float sqrt gives 335.99999... for 442x442 at max 336²)."""
    assert smart_resize(442, 442, factor=14, min_pixels=28 * 28, max_pixels=336 * 336) == (336, 336)
    assert smart_resize(1000, 1000) == (980, 980)
    # 1960x980 at max_pixels 980*490: scale exactly 1/2 → 980/28 = 35 exactly, 490/28 = 17.5.
    assert smart_resize(1960, 980, max_pixels=980 * 490) == (980, 476)
    # Already-conforming sizes are unchanged.
    assert smart_resize(448, 896) == (448, 896)


@pytest.mark.parametrize("h,w", [(0, 100), (100, 0), (1, 1), (1, 500), (500, 1), (-5, 10)])
def test_degenerate_sizes_rejected(h, w):
    with pytest.raises(BadSampleError) as info:
        smart_resize(h, w)
    assert info.value.reason == "degenerate_size"


@settings(database=None)
@given(hw=sizes(max_aspect=50.0))
def test_aspect_bound(hw):
    h, w = hw
    if max(h, w) > 3 * min(h, w):
        with pytest.raises(BadSampleError) as info:
            smart_resize(h, w)
        assert info.value.reason == "extreme_aspect_ratio"
    else:
        smart_resize(h, w)


def test_invalid_policy():
    with pytest.raises(ValueError):
        smart_resize(100, 100, min_pixels=10_000, max_pixels=5_000)
    with pytest.raises(ValueError):
        ResizePolicy(factor=20, patch_size=14)
    with pytest.raises(ValueError):
        num_patches(30, 28)
