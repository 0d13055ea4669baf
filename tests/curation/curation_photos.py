"""Real photos shipped by scikit-image and matplotlib (offline), for the curation tests."""

import functools

import matplotlib.cbook
import skimage.data
from PIL import Image

NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "clock",
         "hubble_deep_field", "immunohistochemistry", "retina", "moon", "brick", "grass", "gravel",
         "motorcycle", "grace_hopper")


@functools.lru_cache(maxsize=None)
def photo(name: str) -> Image.Image:
    """One photo as an RGB PIL image (callers must not modify it in place)."""
    if name == "grace_hopper":
        with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
            return im.convert("RGB")
    if name == "motorcycle":
        return Image.fromarray(skimage.data.stereo_motorcycle()[0])
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
