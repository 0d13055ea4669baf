"""Stage III region-QA tasks: the five task kinds, their mixture and prompt paraphrases, and the
deterministic choice of one image's QA turns.

Task kinds (paper §3.2, "bbox-to-string and string-to-bbox ... bbox-to-ocr and ocr-to-bbox"),
built from the shard schema (``caption``, ``regions[{box, caption, label, score}]``,
``ocr[{box, text}]``):

=================  ==========================  =====================
kind               question holds              answer
=================  ==========================  =====================
global_caption     (a request)                 the global caption
bbox_to_caption    a region's box              its caption
caption_to_bbox    a region's caption          its box
bbox_to_ocr        an OCR box                  its text
ocr_to_bbox        an OCR text                 its box
=================  ==========================  =====================

Several turns per image. One image carries several QA turns in one sequence (a multi-turn chat,
the image in the first user turn), so its ~1,000 image tokens are paid for once rather than once
per region: FineCap has ~5.7 regions per image (454M regions over 80M images). Each annotation
(the caption, each region, each OCR line) serves at most one turn of a conversation, so no turn
gives away another's answer (a bbox→caption turn would reveal the caption→bbox answer for the
same region). Grounding turns (→bbox) only use texts that name one annotation of the image:
a caption or OCR string occurring twice has no single right box.

The draw (``draw_turns``) for one image is a pure function of (seed, sample key, step) through a
hash-seeded generator — no global RNG, so any rank, worker or resumed run draws the same turns.
Turn by turn, up to ``max_turns``: a kind is drawn with probability proportional to its mixture
weight among the kinds that still have an unused annotation (samples lacking regions or OCR fall
back to the available kinds, renormalised; a kind of weight 0 is never drawn), then one of that
kind's unused annotations uniformly, then one of the kind's prompt paraphrases uniformly. A
sample with no drawable kind yields no turns (the loader skips and counts it). ``label`` and
``score`` of regions are not used in prompts (curation filtered on them already).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from megatron_finevit.data.tasks.boxes import BoxCodec
from megatron_finevit.data.tasks.chat import Turn

GLOBAL_CAPTION = "global_caption"
BBOX_TO_CAPTION = "bbox_to_caption"
CAPTION_TO_BBOX = "caption_to_bbox"
BBOX_TO_OCR = "bbox_to_ocr"
OCR_TO_BBOX = "ocr_to_bbox"
TASK_KINDS = (GLOBAL_CAPTION, BBOX_TO_CAPTION, CAPTION_TO_BBOX, BBOX_TO_OCR, OCR_TO_BBOX)

# Prompt paraphrases per kind; "{box}" is the box text, "{text}" the caption / OCR string.
PARAPHRASES = {
    GLOBAL_CAPTION: (
        "Describe this image in detail.",
        "Write a detailed caption for this image.",
        "What does this image show? Give a thorough description.",
        "Provide a comprehensive description of the picture.",
    ),
    BBOX_TO_CAPTION: (
        "Describe the region {box}.",
        "What is in the region {box}? Describe it briefly.",
        "Write a short caption for the area {box} of the image.",
        "Give a description of the object at {box}.",
    ),
    CAPTION_TO_BBOX: (
        "Locate {text} in the image and give its bounding box.",
        "Where is {text}? Answer with a bounding box.",
        "Output the bounding box of the region described as: {text}",
        "Find the region matching this description and output its box: {text}",
    ),
    BBOX_TO_OCR: (
        "What text is written in the region {box}?",
        "Read the text inside {box}.",
        "Recognize the text in the area {box}.",
        "Transcribe the text located at {box}.",
    ),
    OCR_TO_BBOX: (
        'Where is the text "{text}" in the image? Answer with a bounding box.',
        'Give the bounding box of the text "{text}".',
        'Locate the text "{text}" in the image.',
        'Find "{text}" in the image and output its bounding box.',
    ),
}


@dataclasses.dataclass(frozen=True)
class TaskMixture:
    """Relative weights of the task kinds (non-negative, not all zero)."""

    global_caption: float = 1.0
    bbox_to_caption: float = 1.0
    caption_to_bbox: float = 1.0
    bbox_to_ocr: float = 1.0
    ocr_to_bbox: float = 1.0

    def __post_init__(self):
        weights = self.weights()
        bad = {k: w for k, w in weights.items()
               if not isinstance(w, (int, float)) or isinstance(w, bool) or not w >= 0}
        if bad:
            raise ValueError(f"task mixture weights must be non-negative numbers, got {bad}")
        if not any(weights.values()):
            raise ValueError("task mixture weights are all zero: give at least one kind a "
                             "positive weight")

    def weights(self) -> dict[str, float]:
        return {kind: getattr(self, kind) for kind in TASK_KINDS}

    @classmethod
    def from_dict(cls, values: dict) -> "TaskMixture":
        unknown = sorted(set(values) - set(TASK_KINDS))
        if unknown:
            raise ValueError(f"unknown task kinds {unknown} in the mixture; known: "
                             f"{list(TASK_KINDS)}")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One usable piece of a sample: where it comes from (``("region", 3)``), its text and its
    box (None for the global caption)."""

    uid: tuple[str, int]
    text: str
    box: tuple[int, int, int, int] | None


def sample_rng(seed: int, key: str, step: int) -> np.random.Generator:
    """Generator seeded by a hash of (seed, sample key, step): the same on every process."""
    key_hash = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(),
                              "little")
    return np.random.default_rng(np.random.SeedSequence([int(seed), key_hash, int(step)]))


def annotation_pools(meta: dict, codec: BoxCodec, original_hw, resized_hw) -> dict[str, list]:
    """The annotations each kind can use: kind -> list of ``Annotation``."""
    def boxed(field, text_key):
        return [Annotation((field, i), e[text_key].strip(),
                            codec.encode(e["box"], original_hw, resized_hw))
                for i, e in enumerate(meta.get(field, [])) if e[text_key].strip()]

    regions, ocr = boxed("regions", "caption"), boxed("ocr", "text")

    def unique(items):  # grounding needs a text that names one box
        counts: dict[str, int] = {}
        for item in items:
            counts[item.text] = counts.get(item.text, 0) + 1
        return [item for item in items if counts[item.text] == 1]

    caption = meta.get("caption", "").strip()
    return {GLOBAL_CAPTION: [Annotation(("caption", 0), caption, None)] if caption else [],
            BBOX_TO_CAPTION: regions, CAPTION_TO_BBOX: unique(regions),
            BBOX_TO_OCR: ocr, OCR_TO_BBOX: unique(ocr)}


def question_and_answer(kind: str, template: str, item: Annotation,
                         codec: BoxCodec) -> tuple[str, str]:
    if kind == GLOBAL_CAPTION:
        return template, item.text
    box = codec.format(item.box)
    if kind in (BBOX_TO_CAPTION, BBOX_TO_OCR):
        return template.format(box=box), item.text
    return template.format(text=item.text), box


def draw_turns(meta: dict, *, original_hw: tuple[int, int], resized_hw: tuple[int, int],
               codec: BoxCodec, mixture: TaskMixture, seed: int, key: str, step: int,
               max_turns: int) -> list[Turn]:
    """Up to ``max_turns`` QA turns for one image, in conversation order (see module doc).

    Args:
        meta: the validated sample JSON (boxes in original pixels).
        original_hw / resized_hw: the image's size in the shard and after ``smart_resize``.
        step: the draw's step (the loader passes the data epoch, so every pass over the data
            draws afresh while a sample's draw does not depend on how it was packed).
    """
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    pools = annotation_pools(meta, codec, original_hw, resized_hw)
    weights = mixture.weights()
    rng = sample_rng(seed, key, step)
    used: set[tuple[str, int]] = set()  # annotations already asked about (one turn each)
    turns = []
    while len(turns) < max_turns:
        open_kinds = [k for k in TASK_KINDS
                      if weights[k] > 0 and any(a.uid not in used for a in pools[k])]
        if not open_kinds:
            break
        p = np.array([weights[k] for k in open_kinds], dtype=np.float64)
        kind = open_kinds[int(rng.choice(len(open_kinds), p=p / p.sum()))]
        choices = [a for a in pools[kind] if a.uid not in used]
        item = choices[int(rng.integers(len(choices)))]
        used.add(item.uid)
        template = PARAPHRASES[kind][int(rng.integers(len(PARAPHRASES[kind])))]
        turns.append(Turn(*question_and_answer(kind, template, item, codec), kind=kind))
    return turns
