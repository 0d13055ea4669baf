"""PIL reference decoder against numpy oracles; DALI (CPU) against PIL: sizes exactly, pixels
within a stated tolerance; DALI's data-parallel split against dp_partition."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_finevit.data.decode_pil import Normalization, decode_pil, iter_decoded
from megatron_finevit.data.index import build_index, dp_partition, load_index
from megatron_finevit.data.resize import ResizePolicy
from megatron_finevit.data.shards import ShardWriter, list_shards

dali = pytest.importorskip("nvidia.dali")  # a test extra: nvidia-dali-cuda120
from megatron_finevit.data.decode_dali import DaliDecoder  # noqa: E402

# Measured on the shards below (textures + skimage photos, JPEG q95 and PNG, DALI 2.4 vs Pillow
# 13 on CPU): per-image mean |DALI - PIL| after normalisation <= 0.0031, max per pixel 0.088
# (one uint8 step is ~0.015 after /std). Bounds leave ~3× headroom for other libjpeg-turbo builds.
MEAN_ABS_TOL = 0.01
MAX_ABS_TOL = 0.25
POLICY = ResizePolicy(max_pixels=336 * 336, min_pixels=56 * 56)
NORM = Normalization()


def textured(height, width, seed):
    """Smooth random texture (resize of noise): realistic frequencies, decodes identically."""
    rng = np.random.default_rng(seed)
    grid = (max(2, height // 16), max(2, width // 16), 3)
    small = rng.integers(0, 256, size=grid, dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def encoded(image, fmt, **kwargs):
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def photos():
    from skimage import data
    return {name: Image.fromarray(getattr(data, name)()).convert("RGB")
            for name in ("astronaut", "coffee", "chelsea", "rocket")}


# Sizes that hit every branch of smart_resize at POLICY, including exact boundaries (442² → 336²
# where float sqrt would give 335.999...), 3:1 extremes, upscaling from tiny images, odd sides.
SIZES = [(442, 442), (336, 336), (337, 335), (20, 60), (60, 20), (28, 28), (57, 171), (300, 900),
         (900, 300), (601, 599), (999, 333), (123, 77), (449, 448), (2000, 1500), (35, 90)]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode")
    with ShardWriter(out, prefix="mix", max_samples_per_shard=7) as writer:
        for i, (h, w) in enumerate(SIZES):
            fmt, ext, options = ("PNG", "png", {}) if i % 3 == 0 else ("JPEG", "jpg", {"quality": 95})
            writer.write(f"s{i:03d}", encoded(textured(h, w, i), fmt, **options),
                         {"caption": f"texture {i}", "width": w, "height": h}, image_ext=ext)
        for name, image in photos().items():
            writer.write(name, encoded(image, "JPEG", quality=95),
                         {"caption": name, "width": image.width, "height": image.height})
        rotated = textured(200, 300, 99)  # stored 300 wide, displayed upright as 200 wide
        exif = Image.Exif()
        exif[0x0112] = 6
        writer.write("exif_rotated", encoded(rotated, "JPEG", quality=95, exif=exif.tobytes()),
                     {"caption": "rotated", "width": 200, "height": 300})
    build_index(out, POLICY, progress=False)
    return out


def test_pil_solid_colour_oracle():
    """A solid image decodes to the constant (c/255 - mean)/std at the smart_resize size."""
    color = (200, 100, 50)
    out = decode_pil(encoded(Image.new("RGB", (500, 300), color), "PNG"), POLICY, NORM)
    assert out.shape == (3, *POLICY.target_size(300, 500)) and out.dtype == torch.float32
    expected = (torch.tensor(color) / 255 - torch.tensor(NORM.mean)) / torch.tensor(NORM.std)
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected.float(), atol=1e-6, rtol=0)
    assert out.std(dim=(1, 2)).max() < 1e-6


def test_pil_no_resize_equals_numpy_normalisation():
    image = textured(336, 224, 0)  # already multiples of 28 and within bounds: no resize
    out = decode_pil(encoded(image, "PNG"), POLICY, NORM)
    pixels = np.asarray(image, dtype=np.float64) / 255
    expected = (pixels - np.array(NORM.mean)) / np.array(NORM.std)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_pil_exif_orientation_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    out = decode_pil(encoded(textured(200, 300, 1), "JPEG", exif=exif.tobytes()), POLICY, NORM)
    assert out.shape[1:] == POLICY.target_size(300, 200)


def test_pil_draft_is_close_to_full_decode():
    image = photos()["astronaut"].resize((1600, 1600))
    data = encoded(image, "JPEG", quality=95)
    full = decode_pil(data, POLICY, NORM)
    draft = decode_pil(data, POLICY, NORM, use_draft=True)
    assert full.shape == draft.shape
    assert (full - draft).abs().mean() < 0.05


def test_dali_matches_pil_sizes_exactly_and_pixels_closely(shard_dir):
    pil = {key: pixels for key, pixels, _ in iter_decoded(list_shards(shard_dir), POLICY, NORM)}
    dali_out = {key: (pixels, meta) for batch in DaliDecoder(shard_dir, POLICY, NORM, batch_size=8)
                for key, pixels, meta in batch}
    assert sorted(dali_out) == sorted(pil) and len(pil) == len(SIZES) + 5
    index = load_index(shard_dir, POLICY)
    worst = 0.0
    for row, key in enumerate(index.key):
        pixels, meta = dali_out[key]
        expected = (3, index.resized_height[row], index.resized_width[row])
        assert pixels.shape == pil[key].shape == expected, key
        assert meta["caption"] and meta["width"] > 0
        worst = max(worst, (pixels - pil[key]).abs().mean().item())
        assert (pixels - pil[key]).abs().max() < MAX_ABS_TOL, key
    assert worst < MEAN_ABS_TOL, worst


def test_dali_data_parallel_split(shard_dir):
    index = load_index(shard_dir, POLICY)
    seen = []
    for rank in range(3):
        keys = [key for batch in DaliDecoder(shard_dir, POLICY, NORM, batch_size=4, dp_rank=rank,
                                             dp_size=3) for key, _, _ in batch]
        assert keys == list(index.key[dp_partition(len(index), rank, 3).start:
                                      dp_partition(len(index), rank, 3).stop])
        seen += keys
    assert sorted(seen) == sorted(index.key)


def test_dali_shuffle_covers_each_epoch_once(shard_dir):
    decoder = DaliDecoder(shard_dir, POLICY, NORM, batch_size=6, shuffle=True, seed=3,
                          shuffle_buffer=8)
    index = load_index(shard_dir, POLICY)
    epochs = [[key for batch in decoder for key, _, _ in batch] for _ in range(2)]
    for keys in epochs:
        assert sorted(keys) == sorted(index.key)
    assert epochs[0] != list(index.key)  # actually shuffled
