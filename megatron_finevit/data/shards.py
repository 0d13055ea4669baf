"""WebDataset-format tar shards: writing, robust reading, and sample-metadata validation.

On disk a data set is a directory of plain (uncompressed) tar files named `{prefix}-{NNNNNN}.tar`.
Each sample is two consecutive members sharing a key: `{key}.{jpg|png|webp}` (encoded image bytes)
and `{key}.json` (UTF-8 metadata). This is the WebDataset convention, so DALI's
`fn.readers.webdataset` and the `webdataset` package read the same files.

Sample JSON schema (all coordinates in pixels of the *original* image, origin top-left):

    {
      "caption": str,                       # global (re)caption
      "width": int, "height": int,          # original image size
      "regions": [                          # optional: grounded local captions
        {"box": [x1, y1, x2, y2], "caption": str, "label": str, "score": float}
      ],
      "ocr": [                              # optional: text lines
        {"box": [x1, y1, x2, y2], "text": str}
      ]
    }

Samples with several images, or none (conversations, see `data/tasks/conversation.py`), list
their images in the JSON instead of the top-level size, `"images": [{"width": int, "height": int,
...}, ...]`, and store image `i` as member `{key}.{ext}` for i = 0 (the one-image layout above,
so one-image readers still find it) and `{key}.{i}.{ext}` for i >= 1, before `{key}.json`. A
sample with `"images": []` is only its JSON. The number of image members must equal the list's
length ("image_count_mismatch" otherwise).

Reading never trusts the file: truncated tars, members with unsafe paths (absolute or `..`),
missing or invalid JSON, non-UTF-8 text and missing images are skipped and counted in a
`BadSampleCounter`; boxes that are NaN, inverted or outside the image are dropped
(`validate_boxes`).
Member data is only ever read into memory, never extracted to disk.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from megatron_finevit.data.bad_samples import BadSampleCounter, BadSampleError

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_NUMBERED_IMAGE_RE = re.compile(r"^(?:(?P<index>\d+)\.)?(?P<ext>jpg|jpeg|png|webp)$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<num>\d{6})\.tar$")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def list_shards(shard_dir: str | os.PathLike) -> list[Path]:
    """All `*-NNNNNN.tar` shards in `shard_dir`, sorted by name."""
    return sorted(p for p in Path(shard_dir).iterdir() if p.is_file() and _SHARD_RE.match(p.name))


class ShardWriter:
    """Writes samples into numbered tar shards, each published atomically when complete.

    A shard is written to a hidden temporary file in `out_dir` and renamed into place on close,
    so a reader (or the index builder) never sees a half-written shard.

        with ShardWriter(out_dir, prefix="finecap", max_samples_per_shard=1000) as writer:
            writer.write("000001", jpeg_bytes, {"caption": "...", "width": w, "height": h})
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard",
                 max_samples_per_shard: int = 1000, start_index: int = 0):
        if max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
        if not _KEY_RE.match(prefix):
            raise ValueError(f"shard prefix {prefix!r} must match {_KEY_RE.pattern}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples_per_shard = max_samples_per_shard
        self.shard_index = start_index
        self.written_shards: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._in_shard = 0
        self._keys: set[str] = set()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # do not publish a shard cut short by an error
            self._abort()

    def write(self, key: str, image_bytes: bytes, meta: dict, image_ext: str = "jpg") -> None:
        """Append one sample (`{key}.{image_ext}` then `{key}.json`)."""
        self.write_images(key, [(image_bytes, image_ext)], meta)

    def write_images(self, key: str, images: list[tuple[bytes, str]], meta: dict) -> None:
        """Append one sample with any number of `(bytes, ext)` images (`meta["images"]` must
        list them; see the module docstring for the member names)."""
        if not _KEY_RE.match(key):
            raise ValueError(f"sample key {key!r} must match {_KEY_RE.pattern} (no dots/slashes)")
        if any(ext not in IMAGE_EXTS for _, ext in images):
            raise ValueError(f"image extensions {[e for _, e in images]} not all in {IMAGE_EXTS}")
        if len(images) != 1 and len(meta.get("images", ())) != len(images):
            raise ValueError(f"meta must list the sample's {len(images)} images under 'images'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        if self._tar is None:
            self._open_next()
        self._keys.add(key)
        for i, (data, ext) in enumerate(images):
            self._add_member(f"{key}.{ext}" if i == 0 else f"{key}.{i}.{ext}", data)
        self._add_member(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        self._in_shard += 1
        if self._in_shard >= self.max_samples_per_shard:
            self._publish()

    def close(self) -> None:
        if self._tar is not None:
            self._publish()

    def _open_next(self) -> None:
        name = shard_name(self.prefix, self.shard_index)
        self._tmp_path = self.out_dir / f".{name}.tmp"
        self._tar = tarfile.open(self._tmp_path, "w", format=tarfile.USTAR_FORMAT)
        self._in_shard = 0

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0  # fixed, so that the same samples give byte-identical shards
        self._tar.addfile(info, io.BytesIO(data))

    def _publish(self) -> None:
        self._tar.close()
        final = self.out_dir / shard_name(self.prefix, self.shard_index)
        with open(self._tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp_path, final)
        self.written_shards.append(final)
        self.shard_index += 1
        self._tar = None
        self._tmp_path = None

    def _abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tmp_path.unlink(missing_ok=True)
            self._tar = None


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset rule: the key is everything before the first dot of the basename."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def is_safe_member_name(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


def _group_members(tar: tarfile.TarFile, shard: str,
                   counter: BadSampleCounter) -> Iterator[tuple[str, dict[str, tuple]]]:
    """Yield (key, {ext: (name, offset_data, size, bytes)}) per run of members sharing a key.

    Raises ``tarfile.ReadError`` (or EOFError) at a cut; the sample held at the cut is yielded
    first when it is whole (an image and its JSON): a cut at a sample boundary loses nothing of it.
    """
    key, parts = None, {}
    try:
        for member in tar:
            if not member.isfile() or not is_safe_member_name(member.name):
                counter.skip("unsafe_member", shard=shard, member=member.name,
                             detail="non-regular file or path escaping the shard")
                continue
            member_key, ext = split_member_name(member.name)
            if member_key != key:
                if key is not None:
                    yield key, parts
                key, parts = member_key, {}
            data = tar.extractfile(member).read()
            if len(data) != member.size:
                raise tarfile.ReadError(f"member {member.name} truncated")
            parts[ext.lower()] = (member.name, member.offset_data, member.size, data)
        # tarfile ends iteration silently at a cut inside a header or at a member boundary; only
        # the end-of-archive marker (two zero blocks) tells a complete shard from a truncated one.
        tar.fileobj.seek(tar.offset)
        if tar.fileobj.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
            raise tarfile.ReadError("no end-of-archive marker: the shard is truncated")
    except (tarfile.ReadError, EOFError, OSError):
        if key is not None and _is_whole_sample(parts):
            yield key, parts
        raise
    if key is not None:
        yield key, parts


def _is_whole_sample(parts: dict[str, tuple]) -> bool:
    """Whether a sample's members seen so far make a whole sample (an image and its JSON); the
    members of a sample cut off by a truncated shard may be missing."""
    return "json" in parts and any(ext in parts for ext in IMAGE_EXTS)


def iter_shard_records(path: str | os.PathLike, counter: BadSampleCounter | None = None
                       ) -> Iterator[tuple[str, str, bytes, dict, dict]]:
    """Like `iter_shard`, for consumers that check samples further (decode, size policy).

    Yields `(key, image_ext, image_bytes, meta, layout)` where `layout` maps each member
    extension to `(member_name, data_offset, size)` (what a DALI index needs). Skips are counted
    here, but accepting a sample is left to the caller: call `counter.ok()` once it is used.
    This is the one-image view: a sample's first image; samples without one are skipped as
    "missing_image" (`iter_shard_samples` gives them all).
    """
    counter = counter if counter is not None else BadSampleCounter(name=str(path))
    for key, images, meta, layout in iter_shard_samples(path, counter):
        if not images:
            counter.skip("missing_image", shard=Path(path).name, member=key,
                         detail="sample has no image")
            continue
        yield key, *images[0], meta, layout


def iter_shard_samples(path: str | os.PathLike, counter: BadSampleCounter | None = None
                       ) -> Iterator[tuple[str, list[tuple[str, bytes]], dict, dict]]:
    """Yields `(key, images, meta, layout)` per usable sample, `images` = `[(ext, bytes)]` in
    order (one for a one-image sample, 0..n for a sample whose meta lists `images`); otherwise as
    `iter_shard_records`."""
    counter = counter if counter is not None else BadSampleCounter(name=str(path))
    shard = Path(path).name
    with open(path, "rb") as fileobj:  # a missing shard is a configuration error: raise
        try:
            tar = tarfile.open(fileobj=fileobj, mode="r:")
        except tarfile.ReadError as err:
            counter.skip("corrupt_tar", shard=shard, detail=str(err))
            return
        yield from _iter_parsed(tar, shard, counter)


def _iter_parsed(tar: tarfile.TarFile, shard: str, counter: BadSampleCounter):
    try:
        with tar:
            for key, parts in _group_members(tar, shard, counter):
                try:
                    images, meta = _parse_sample(key, parts)
                    meta = validate_meta(meta, counter=counter, shard=shard, member=key)
                except BadSampleError as err:
                    counter.skip_error(err, shard=shard, member=key)
                    continue
                layout = {ext: p[:3] for ext, p in parts.items()}
                yield key, images, meta, layout
    except (tarfile.ReadError, EOFError, OSError) as err:
        # tarfile reports a cut-off archive as ReadError/EOFError; samples before it are kept.
        counter.skip("truncated_tar", shard=shard, detail=str(err))


def iter_shard(path: str | os.PathLike, counter: BadSampleCounter | None = None
               ) -> Iterator[tuple[str, bytes, dict]]:
    """Yield `(key, image_bytes, meta)` for every usable sample of one shard.

    Broken samples are skipped and counted in `counter` (a fresh one if None); a truncated shard
    yields the samples before the cut. Image bytes are not decoded here (see the decoders).
    """
    counter = counter if counter is not None else BadSampleCounter(name=str(path))
    for key, _, image_bytes, meta, _ in iter_shard_records(path, counter):
        counter.ok()
        yield key, image_bytes, meta


def _parse_sample(key: str, parts: dict[str, tuple]) -> tuple[list[tuple[str, bytes]], dict]:
    """`([(image ext, bytes)], meta)`; the JSON decides between the one-image layout and a
    listed number of images (module docstring)."""
    first_ext = next((ext for ext in IMAGE_EXTS if ext in parts), None)
    if "json" not in parts:
        raise BadSampleError("missing_image" if first_ext is None else "missing_json",
                             f"sample {key} has members {sorted(parts)}")
    try:
        text = parts["json"][3].decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadSampleError("non_utf8", str(err)) from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadSampleError("invalid_json", str(err)) from None
    if not isinstance(meta, dict):
        raise BadSampleError("invalid_json", f"top level is {type(meta).__name__}, not an object")
    listed = meta.get("images")
    if listed is None:  # one-image sample: extra image members (if any) are ignored, as before
        if first_ext is None:
            raise BadSampleError("missing_image", f"sample {key} has members {sorted(parts)}")
        return [(first_ext, parts[first_ext][3])], meta
    numbered = {}
    for ext in parts:
        match = _NUMBERED_IMAGE_RE.match(ext)
        if match:
            numbered.setdefault(int(match["index"] or 0), []).append(ext)
    if (not isinstance(listed, list) or sorted(numbered) != list(range(len(listed)))
            or any(len(exts) > 1 for exts in numbered.values())):
        raise BadSampleError("image_count_mismatch", f"sample {key} has image members "
                             f"{sorted(e for x in numbered.values() for e in x)} for "
                             f"{len(listed) if isinstance(listed, list) else listed!r} images")
    return [(numbered[i][0], parts[numbered[i][0]][3]) for i in range(len(listed))], meta


def validate_meta(meta: dict, counter: BadSampleCounter | None = None, shard: str = "",
                  member: str = "") -> dict:
    """Check the schema of one sample's metadata; returns a cleaned copy.

    Raises BadSampleError("invalid_meta") for a wrong caption/width/height type (every entry of
    `images` when the sample lists its images; boxes then refer to the first). Regions and OCR
    entries with bad boxes or text are dropped (counted in `counter`).
    """
    caption = meta.get("caption", "")
    if not isinstance(caption, str):
        raise BadSampleError("invalid_meta", f"caption is {type(caption).__name__}")
    sizes = meta["images"] if "images" in meta else [meta]
    if not isinstance(sizes, list) or not all(isinstance(s, dict) for s in sizes):
        raise BadSampleError("invalid_meta", "images must be a list of objects")
    for size in sizes:
        width, height = size.get("width"), size.get("height")
        if not (isinstance(width, int) and isinstance(height, int)) or width < 1 or height < 1:
            raise BadSampleError("invalid_meta", f"width/height must be positive ints, got "
                                                 f"{width!r}/{height!r}")
    width, height = (sizes[0]["width"], sizes[0]["height"]) if sizes else (0, 0)
    out = dict(meta)
    for field, text_key in (("regions", "caption"), ("ocr", "text")):
        entries = meta.get(field, [])
        if not isinstance(entries, list):
            raise BadSampleError("invalid_meta", f"{field} must be a list")
        well_formed = [e for e in entries
                       if isinstance(e, dict) and isinstance(e.get(text_key), str)]
        if counter is not None:
            counter.drop(f"{field}_malformed", len(entries) - len(well_formed), shard, member)
        out[field] = validate_boxes(well_formed, width, height, counter, shard, member)
    return out


def validate_boxes(entries: list[dict], width: int, height: int,
                   counter: BadSampleCounter | None = None, shard: str = "", member: str = ""
                   ) -> list[dict]:
    """Keep entries whose `box` = [x1, y1, x2, y2] is finite, x1 < x2, y1 < y2, inside the image.

    "Inside" means 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height. Dropped entries are counted
    in `counter` under "box_invalid" (not a number / wrong length), "box_inverted" (empty or
    inverted) or "box_outside".
    """
    kept = []
    for entry in entries:
        reason = _box_problem(entry.get("box"), width, height)
        if reason is None:
            kept.append(entry)
        elif counter is not None:
            counter.drop(reason, 1, shard, member)
    return kept


def _box_problem(box, width: int, height: int) -> str | None:
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
            or not all(math.isfinite(v) for v in box)):
        return "box_invalid"
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        return "box_inverted"
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        return "box_outside"
    return None
