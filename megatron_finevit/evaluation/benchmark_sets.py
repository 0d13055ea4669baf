"""Importers for the paper's evaluation sets (§4): which image files, which classes or captions.

Zero-shot classification (labels are indices into open_clip's 1,000 ImageNet class names):

* ``imagenet1k`` — the ILSVRC2012 validation images, either in class-synset folders
  (``DIR/n01440764/ILSVRC2012_val_00000293.JPEG``; the sorted synset order is the class index,
  so all 1,000 folders must be there) or flat (``DIR/ILSVRC2012_val_*.JPEG``) with a
  ``DIR/val.txt`` of ``filename label`` lines (0-based labels in sorted-synset order, as the
  common ``val.txt`` files have). The devkit's ``ILSVRC2012_validation_ground_truth.txt`` is not
  read: its ids follow ``meta.mat``'s order, not the synsets'.
* ``imagenet_v2`` — ImageNetV2 as it unpacks: folders ``DIR/0`` … ``DIR/999`` named by class
  index.
* ``imagenet_real`` — the ImageNet validation images (either layout above) plus ReaL's
  ``DIR/real.json``: per validation image in file-name order, the list of its correct labels.
  Images with an empty list are excluded; a prediction is correct if it is in the image's list.

Retrieval (image ↔ text):

* ``coco`` / ``flickr30k`` — Karpathy's split files ``DIR/dataset_coco.json`` /
  ``DIR/dataset_flickr30k.json`` (``{"images": [{"filename", "filepath"?, "split",
  "sentences": [{"raw"}]}]}``); the ``test`` split, the first 5 captions of each image. Images
  are read from ``DIR/<filepath>/<filename>`` (COCO: ``val2014/``); Flickr30k's entries have no
  ``filepath`` and its images are read from ``DIR/flickr30k-images/`` (the archive's folder).
* ``dci`` / ``iiw`` / ``urban1k`` — one long caption per image, given either as ``DIR/image/``
  and ``DIR/caption/`` folders with matching file stems (``image/12.jpg`` ↔ ``caption/12.txt``,
  as Urban-1K ships), or as ``DIR/captions.jsonl`` lines ``{"image": path relative to DIR,
  "caption": text}`` (what DCI's and IIW's annotation files reduce to).

Image files are listed, not opened: unreadable ones are skipped when embedded
(``evaluation.benchmarks``). A layout that does not match raises ``BenchmarkDataError`` (one
line, for the CLI).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megatron_finevit.config.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SYNSET = re.compile(r"n\d{8}")
KARPATHY_CAPTIONS = 5


class BenchmarkDataError(UserError):
    """A benchmark directory that does not hold the expected layout."""

    kind = "data error"


@dataclass
class ClassificationSet:
    """``labels[i]``: the correct class indices of ``images[i]`` (one each, or ReaL's set);
    ``num_classes``: the classes the layout defines (None: not fixed by the layout)."""

    images: list[Path]
    labels: list[list[int]]
    num_classes: int | None = None


@dataclass
class RetrievalSet:
    """``caption_image[j]``: the index in ``images`` of the image ``captions[j]`` describes."""

    images: list[Path]
    captions: list[str]
    caption_image: list[int]


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchmarkDataError(f"{path}: cannot be read as JSON ({exc})") from None


def _synset_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and SYNSET.fullmatch(p.name))


def imagenet_val(root: Path) -> ClassificationSet:
    """ImageNet-1k validation in synset folders, or flat with ``val.txt`` (module docstring)."""
    folders = _synset_folders(root)
    if folders:
        images, labels = [], []
        for label, folder in enumerate(folders):
            files = _image_files(folder)
            images += files
            labels += [[label]] * len(files)
        return ClassificationSet(images, labels, num_classes=len(folders))
    listing = root / "val.txt"
    if not listing.is_file():
        raise BenchmarkDataError(f"{root} has neither synset folders (n01440764/ ...) nor a "
                                 "val.txt of 'filename label' lines")
    images, labels = [], []
    for number, line in enumerate(listing.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].isdigit():
            raise BenchmarkDataError(f"{listing}:{number}: expected 'filename label', got "
                                     f"{line.strip()!r}")
        images.append(root / fields[0])
        labels.append([int(fields[1])])
    return ClassificationSet(images, labels)


def imagenet_v2(root: Path) -> ClassificationSet:
    """ImageNetV2: folders named by class index."""
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name)
    bad = [p.name for p in folders if not p.name.isdigit()]
    if not folders or bad:
        raise BenchmarkDataError(f"{root} must hold class folders named 0 ... 999"
                                 + (f", found {bad[:3]}" if bad else ""))
    images, labels = [], []
    for folder in folders:
        files = _image_files(folder)
        images += files
        labels += [[int(folder.name)]] * len(files)
    return ClassificationSet(images, labels)


def imagenet_real(root: Path) -> ClassificationSet:
    """ImageNet validation images (either layout) with ReaL's ``real.json`` label sets."""
    if not (root / "real.json").is_file():
        raise BenchmarkDataError(f"{root} has no real.json (ReaL's labels)")
    real = _read_json(root / "real.json")
    if not isinstance(real, list) or not all(isinstance(r, list) for r in real):
        raise BenchmarkDataError(f"{root}/real.json must be a list of label lists "
                                 "(ReaL's real.json)")
    folders = _synset_folders(root)
    files = [f for folder in folders for f in _image_files(folder)] or _image_files(root)
    files.sort(key=lambda p: p.name)  # ReaL's order: the validation file names
    if len(files) != len(real):
        raise BenchmarkDataError(f"{root} holds {len(files)} images but real.json lists "
                                 f"{len(real)}: give the whole validation set")
    kept = [(path, labels) for path, labels in zip(files, real) if labels]
    return ClassificationSet([p for p, _ in kept], [list(map(int, l)) for _, l in kept])


def karpathy(json_name: str, default_dir: str) -> Callable[[Path], RetrievalSet]:
    """The importer of a Karpathy split file (``filepath`` defaults to ``default_dir``)."""

    def load(root: Path) -> RetrievalSet:
        split = root / json_name
        if not split.is_file():
            raise BenchmarkDataError(f"{root} has no {json_name} (Karpathy's split file)")
        entries = _read_json(split)
        if not isinstance(entries, dict) or not isinstance(entries.get("images"), list):
            raise BenchmarkDataError(f"{split}: expected {{'images': [...]}}")
        images, captions, owner = [], [], []
        for number, entry in enumerate(entries["images"]):
            if entry.get("split") != "test":
                continue
            try:
                sentences = [s["raw"].strip() for s in entry["sentences"]][:KARPATHY_CAPTIONS]
                path = root / entry.get("filepath", default_dir) / entry["filename"]
            except (KeyError, TypeError, AttributeError):
                raise BenchmarkDataError(f"{split}: image {number} needs 'filename' and "
                                         "'sentences': [{'raw': ...}]") from None
            if not sentences:
                raise BenchmarkDataError(f"{split}: {path.name} has no captions")
            owner += [len(images)] * len(sentences)
            captions += sentences
            images.append(path)
        if not images:
            raise BenchmarkDataError(f"{split} has no images in the test split")
        return RetrievalSet(images, captions, owner)

    return load


def long_text(root: Path) -> RetrievalSet:
    """One long caption per image: ``image/`` + ``caption/`` folders or ``captions.jsonl``."""
    pairs: list[tuple[Path, str]] = []
    if (root / "image").is_dir() and (root / "caption").is_dir():
        for image in _image_files(root / "image"):
            caption = root / "caption" / f"{image.stem}.txt"
            if not caption.is_file():
                raise BenchmarkDataError(f"{image} has no caption file {caption}")
            pairs.append((image, caption.read_text().strip()))
    elif (root / "captions.jsonl").is_file():
        listing = root / "captions.jsonl"
        for number, line in enumerate(listing.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((root / row["image"], str(row["caption"]).strip()))
            except (ValueError, KeyError, TypeError):
                raise BenchmarkDataError(f"{listing}:{number}: expected a JSON object with "
                                         "'image' and 'caption'") from None
    else:
        raise BenchmarkDataError(f"{root} has neither image/ + caption/ folders nor "
                                 "captions.jsonl")
    if not pairs:
        raise BenchmarkDataError(f"{root} holds no image-caption pairs")
    return RetrievalSet([p for p, _ in pairs], [c for _, c in pairs], list(range(len(pairs))))


@dataclass(frozen=True)
class Benchmark:
    """A named set: ``kind`` is "zero_shot" or "retrieval"; ``load(DIR)`` its importer."""

    name: str
    kind: str
    load: Callable[[Path], ClassificationSet | RetrievalSet]


BENCHMARKS = {b.name: b for b in (
    Benchmark("imagenet1k", "zero_shot", imagenet_val),
    Benchmark("imagenet_v2", "zero_shot", imagenet_v2),
    Benchmark("imagenet_real", "zero_shot", imagenet_real),
    Benchmark("coco", "retrieval", karpathy("dataset_coco.json", "")),
    Benchmark("flickr30k", "retrieval", karpathy("dataset_flickr30k.json", "flickr30k-images")),
    Benchmark("dci", "retrieval", long_text),
    Benchmark("iiw", "retrieval", long_text),
    Benchmark("urban1k", "retrieval", long_text),
)}
