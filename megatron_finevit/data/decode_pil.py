"""Reference image decoder (Pillow): encoded bytes → normalised float tensor, smart_resize size.

This is the decoder every other one is tested against, and the fallback when DALI is absent.

    bytes ─ header check (format, size, EXIF orientation, pixel cap) ─ full decode ─ RGB
          ─ resize to ResizePolicy.target_size (Pillow BILINEAR, which antialiases when shrinking)
          ─ (x / 255 - mean) / std  →  float32 [3, H, W]

Safety: the pixel count is checked from the header *before* any pixel is decoded, so a small file
that declares a huge image (a decompression bomb) is rejected for the cost of parsing a header.
Pillow's own guard (`Image.MAX_IMAGE_PIXELS`) would only warn below 2× its limit; ours is exact.

Integrity: Pillow does not check the CRC of a PNG's image data chunks (IDAT), so a flipped bit
there decodes silently into wrong pixels; every PNG chunk's CRC is checked with the header (a
CRC-32 pass over the bytes, far cheaper than the decode), and a mismatch is "corrupt_image".

Every failure is a `BadSampleError` with a reason: "corrupt_image" (undecodable), "truncated_image",
"decompression_bomb", plus the size reasons of `smart_resize`.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from megatron_finevit.data.bad_samples import BadSampleCounter, BadSampleError
from megatron_finevit.data.resize import ResizePolicy
from megatron_finevit.data.shards import iter_shard_records

# FineCap images have sides up to 4096 px (paper Fig. 6); allow 2× that per side.
DEFAULT_MAX_DECODE_PIXELS = 8192 * 8192
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_EXIF_ORIENTATION_TAG = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Per-channel mean/std on the [0, 1] scale (RGB). Default: the CLIP/Qwen-ViT statistics."""

    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def open_image(image_bytes: bytes,
               max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS) -> tuple[Image.Image, int, int]:
    """Parse only the header (and check a PNG's chunk CRCs): returns (lazy PIL image, height,
    width) after EXIF orientation.

    Raises BadSampleError("corrupt_image" | "truncated_image" | "decompression_bomb").
    """
    try:
        with warnings.catch_warnings():
            # Pillow warns (or raises) on its own, looser limit; we enforce ours below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(image_bytes))
    except Image.DecompressionBombError as err:
        raise BadSampleError("decompression_bomb", str(err)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadSampleError("corrupt_image", str(err)) from None
    width, height = image.size
    if width * height > max_decode_pixels:
        raise BadSampleError("decompression_bomb",
                             f"header declares {width}x{height} = {width * height} pixels > cap "
                             f"{max_decode_pixels}")
    if image.format == "PNG":
        check_png_chunks(image_bytes)
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not kill a readable image
        orientation = 1
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return image, height, width


def check_png_chunks(png_bytes: bytes) -> None:
    """Raise BadSampleError unless every chunk of a PNG up to IEND is whole ("truncated_image")
    and matches its CRC-32 ("corrupt_image")."""
    view, pos = memoryview(png_bytes), len(_PNG_SIGNATURE)
    while pos + 12 <= len(view):  # length, type, data, CRC
        length = int.from_bytes(view[pos:pos + 4], "big")
        end = pos + 12 + length
        if end > len(view):
            break
        kind = bytes(view[pos + 4:pos + 8])
        if zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            raise BadSampleError("corrupt_image", f"PNG chunk {kind.decode('latin-1')} at byte "
                                                  f"{pos}: CRC mismatch")
        if kind == b"IEND":
            return
        pos = end
    raise BadSampleError("truncated_image", f"PNG ends at byte {len(view)} before its IEND chunk")


def decode_rgb(image_bytes: bytes,
               max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS) -> Image.Image:
    """Fully decode to an upright RGB PIL image (alpha dropped, EXIF orientation applied)."""
    return load_rgb(open_image(image_bytes, max_decode_pixels)[0])


def load_rgb(image: Image.Image) -> Image.Image:
    """Decode the pixels of an image returned by `open_image` → upright RGB."""
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except OSError as err:
        reason = "truncated_image" if "truncated" in str(err) else "corrupt_image"
        raise BadSampleError(reason, str(err)) from None
    except (SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadSampleError("corrupt_image", str(err)) from None
    return image.convert("RGB")


def normalize_hwc_uint8(pixels: np.ndarray, norm: Normalization) -> torch.Tensor:
    """uint8 [H, W, 3] → float32 [3, H, W] with (x / 255 - mean) / std."""
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(norm.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32).view(3, 1, 1)
    return tensor.sub_(mean).div_(std)


def decode_pil(image_bytes: bytes, policy: ResizePolicy = ResizePolicy(),
               norm: Normalization = Normalization(),
               max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS,
               use_draft: bool = False) -> torch.Tensor:
    """Decode, resize to `policy.target_size` and normalise: returns float32 `[3, H, W]`.

    `use_draft=True` lets libjpeg decode JPEGs at a reduced DCT scale (1/2, 1/4, 1/8) when the
    target is at least that much smaller: much faster for large photos, slightly different pixels.
    The reference (and the default) decodes at full size.
    """
    image, height, width = open_image(image_bytes, max_decode_pixels)
    target_h, target_w = policy.target_size(height, width)  # size errors before any decode work
    if use_draft and image.format == "JPEG":
        transposed = image.size != (width, height)  # draft() works in stored, pre-EXIF axes
        image.draft("RGB", (target_h, target_w) if transposed else (target_w, target_h))
    return resize_and_normalize(load_rgb(image), (target_h, target_w), norm)


def resize_and_normalize(rgb: Image.Image, size: tuple[int, int],
                         norm: Normalization = Normalization()) -> torch.Tensor:
    """An upright RGB image -> float32 ``[3, H, W]`` at ``size`` = (H, W) (Pillow BILINEAR), then
    normalised: the step after decoding (also the transformers image processor's)."""
    target_h, target_w = size
    if rgb.size != (target_w, target_h):
        rgb = rgb.resize((target_w, target_h), Image.BILINEAR)
    return normalize_hwc_uint8(np.array(rgb), norm)  # np.array: a writable copy


def iter_decoded(shard_paths, policy: ResizePolicy = ResizePolicy(),
                 norm: Normalization = Normalization(), counter: BadSampleCounter | None = None,
                 max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS, use_draft: bool = False
                 ) -> Iterator[tuple[str, torch.Tensor, dict]]:
    """Decode every usable sample of `shard_paths` in order: yields (key, [3, H, W], meta).

    Samples that fail to decode are skipped and counted like the shard-level failures.
    """
    counter = counter if counter is not None else BadSampleCounter(name="decode_pil")
    for path in shard_paths:
        for key, _, image_bytes, meta, _ in iter_shard_records(path, counter):
            try:
                pixels = decode_pil(image_bytes, policy, norm, max_decode_pixels, use_draft)
            except BadSampleError as err:
                counter.skip_error(err, shard=Path(path).name, member=key)
                continue
            counter.ok()
            yield key, pixels, meta
