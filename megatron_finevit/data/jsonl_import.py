"""Import user data (an image folder + a JSONL manifest) into WebDataset shards.

Manifest: one JSON object per line,

    {"image": "relative/path.jpg", "caption": "...",
     "regions": [{"box": [x1, y1, x2, y2], "caption": "...", "label": "...", "score": 0.9}],
     "ocr": [{"box": [x1, y1, x2, y2], "text": "..."}]}

`regions` and `ocr` are optional; boxes are in pixels of the image file. Lines that are not valid
JSON objects, images that are missing, outside the image folder, undecodable by their header,
over the pixel cap or of an unsupported format are skipped and counted; invalid boxes are dropped.
JPEG, PNG and WebP bytes are stored unchanged (no re-encoding loss).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from megatron_finevit.data.bad_samples import BadSampleCounter, BadSampleError
from megatron_finevit.data.decode_pil import DEFAULT_MAX_DECODE_PIXELS, open_image
from megatron_finevit.data.shards import ShardWriter, validate_meta

logger = logging.getLogger(__name__)

_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def read_image_file(images_dir: Path, relative: str, max_decode_pixels: int
                    ) -> tuple[bytes, str, int, int]:
    """The file `relative` inside `images_dir` (an absolute, resolved folder) → (bytes, shard
    extension, height, width), header checked only. Raises BadSampleError ("unsafe_path",
    "missing_image", "unsupported_format" or `open_image`'s reasons)."""
    path = (images_dir / relative).resolve()
    if not path.is_relative_to(images_dir):
        raise BadSampleError("unsafe_path", f"{relative} is outside {images_dir}")
    if not path.is_file():
        raise BadSampleError("missing_image", str(path))
    image_bytes = path.read_bytes()
    image, height, width = open_image(image_bytes, max_decode_pixels)
    ext = _FORMAT_EXT.get(image.format)
    if ext is None:
        raise BadSampleError("unsupported_format", f"{path.name} is {image.format}")
    return image_bytes, ext, height, width


def _manifest_entry(line: str, images_dir: Path,
                    max_decode_pixels: int) -> tuple[bytes, str, dict]:
    """One manifest line → (image bytes, extension, sample meta). Raises BadSampleError."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadSampleError("invalid_json", str(err)) from None
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        raise BadSampleError("invalid_meta", "line must be an object with an \"image\" path")
    image_bytes, ext, height, width = read_image_file(images_dir, entry["image"],
                                                      max_decode_pixels)
    meta = {"caption": entry.get("caption", ""), "width": width, "height": height,
            "regions": entry.get("regions", []), "ocr": entry.get("ocr", []),
            "source": entry["image"]}
    return image_bytes, ext, meta


def import_jsonl(images_dir: str | Path, manifest: str | Path, out_dir: str | Path,
                 prefix: str = "imported", samples_per_shard: int = 1000,
                 counter: BadSampleCounter | None = None,
                 max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS) -> list[Path]:
    """Convert the manifest's samples to shards in `out_dir`; returns the shard paths."""
    images_dir = Path(images_dir).resolve()
    counter = counter if counter is not None else BadSampleCounter(name="import_jsonl")
    with ShardWriter(out_dir, prefix=prefix, max_samples_per_shard=samples_per_shard) as writer, \
            open(manifest, "rb") as lines:
        for line_no, raw in enumerate(tqdm(lines, desc="importing", unit="line"), start=1):
            member = f"{Path(manifest).name}:{line_no}"
            if not raw.strip():
                continue
            try:
                image_bytes, ext, meta = _manifest_entry(raw.decode("utf-8"), images_dir,
                                                         max_decode_pixels)
                meta = validate_meta(meta, counter, member=member)
            except UnicodeDecodeError as err:
                counter.skip("non_utf8", member=member, detail=str(err))
                continue
            except BadSampleError as err:
                counter.skip_error(err, member=member)
                continue
            writer.write(f"{line_no:09d}", image_bytes, meta, image_ext=ext)
            counter.ok()
    logger.info("imported %s into %d shards in %s: %s", manifest, len(writer.written_shards),
                out_dir, counter.summary())
    return writer.written_shards
