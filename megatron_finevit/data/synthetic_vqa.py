"""A synthetic VQA set from FineCap-mini: questions answered from each image's ground truth, as
SFT conversation shards (the training split and a held-out split).

Per image (its bytes stored unchanged, one image per conversation), questions of three kinds:

- ``count``: "How many shapes are in the image?" → the number of shapes, as digits ("3");
- ``color``: "What colour is the <shape>?", only for a shape name that occurs once in the image
  → its colour name ("red");
- ``read``: "What word is written in the image?", only when the image holds exactly one word →
  the word as rendered ("DELTA").

Each kind has several paraphrases; which one, and which shape a colour question names, is drawn
from a generator seeded by (seed, sample key) (``region_qa.sample_rng``), so the same seed gives
byte-identical shards and any sample can be regenerated on its own. The questions are
independent of each other (no answer refers to an earlier turn), so evaluation may ask each one
on its own.

Splits. ``eval``: one turn per kind the image allows, in ``VQA_KINDS`` order (held-out images:
every question is scored). ``train``: 1..3 turns of the allowed kinds in drawn order (a
multi-turn conversation), and after every ``TEXT_ONLY_EVERY`` images one text-only conversation
(``arithmetic``: "What is 3 plus 4?" → "7"; ``mixing``: "What colour do you get by mixing blue
and yellow?" → "green"), so the SFT path also sees samples without an image.

A sample is the conversation form of ``data/tasks/conversation.py`` plus ``"vqa_kinds"``: the
kind of each assistant turn, in order (``validate_meta`` keeps extra keys). The source must be
FineCap-mini: a sample with a region that is not a named-colour shape is skipped as
"not_finecap_mini" (counted; too many abort).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from megatron_finevit.data.bad_samples import BadSampleCounter, BadSampleError
from megatron_finevit.data.shards import ShardWriter, iter_shard_records, list_shards, validate_meta
from megatron_finevit.data.synthetic import COLORS, SHAPES
from megatron_finevit.data.tasks.chat import Message
from megatron_finevit.data.tasks.conversation import check_messages, messages_to_json
from megatron_finevit.data.tasks.region_qa import sample_rng

logger = logging.getLogger(__name__)

COUNT, COLOR, READ = "count", "color", "read"
VQA_KINDS = (COUNT, COLOR, READ)
ARITHMETIC, MIXING = "arithmetic", "mixing"
TEXT_KINDS = (ARITHMETIC, MIXING)
SPLITS = ("train", "eval")
TEXT_ONLY_EVERY = 8  # train split: one text-only conversation after every 8 images
MAX_TRAIN_TURNS = 3

PARAPHRASES = {
    COUNT: ("How many shapes are in the image?", "How many shapes can you see?",
            "Count the shapes in this picture.", "What is the number of shapes in the image?"),
    COLOR: ("What colour is the {shape}?", "What is the colour of the {shape}?",
            "Which colour does the {shape} have?", "Name the colour of the {shape}."),
    READ: ("What word is written in the image?", "What does the text in the image say?",
           "Read the word in this picture.", "Which word appears in the image?"),
    ARITHMETIC: ("What is {a} plus {b}?", "Add {a} and {b}.", "How much is {a} + {b}?"),
    MIXING: ("What colour do you get by mixing {a} and {b}?",
             "Mixing {a} paint with {b} paint gives which colour?"),
}
MIXES = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("blue", "red"): "purple",
         ("black", "white"): "grey"}


@dataclasses.dataclass(frozen=True)
class VQATurn:
    kind: str
    question: str
    answer: str


def answer_pools(meta: dict) -> dict[str, list[tuple[dict, str]]]:
    """Per kind, the ``(paraphrase fields, answer)`` the image's ground truth allows (empty list:
    the kind cannot be asked). Raises BadSampleError("not_finecap_mini") for a region that is
    not a named-colour shape."""
    shapes = []
    for region in meta.get("regions", []):
        colors = [w for w in region["caption"].split() if w in COLORS]
        if region.get("label") not in SHAPES or len(colors) != 1:
            raise BadSampleError("not_finecap_mini",
                                 f"region {region.get('label')!r} / {region['caption']!r} is not "
                                 "a named-colour shape")
        shapes.append((region["label"], colors[0]))
    names = Counter(shape for shape, _ in shapes)
    words = [entry["text"].strip() for entry in meta.get("ocr", []) if entry["text"].strip()]
    return {COUNT: [({}, str(len(shapes)))],
            COLOR: [({"shape": shape}, color) for shape, color in shapes if names[shape] == 1],
            READ: [({}, words[0])] if len(words) == 1 else []}


def _turn(rng, kind: str, pool: list[tuple[dict, str]]) -> VQATurn:
    fields, answer = pool[int(rng.integers(len(pool)))]
    paraphrase = PARAPHRASES[kind][int(rng.integers(len(PARAPHRASES[kind])))]
    return VQATurn(kind, paraphrase.format(**fields), answer)


def image_turns(meta: dict, split: str, seed: int, key: str) -> list[VQATurn]:
    """The questions about one FineCap-mini image (module doc): ``eval`` one per allowed kind in
    ``VQA_KINDS`` order, ``train`` 1..3 of them in drawn order."""
    pools = answer_pools(meta)
    rng = sample_rng(seed, key, 0)
    kinds = [kind for kind in VQA_KINDS if pools[kind]]
    if split == "train":
        kinds = [kinds[i] for i in rng.permutation(len(kinds))]
        kinds = kinds[:int(rng.integers(1, min(MAX_TRAIN_TURNS, len(kinds)) + 1))]
    return [_turn(rng, kind, pools[kind]) for kind in kinds]


def text_only_turn(seed: int, key: str) -> VQATurn:
    """One question without an image: small-number addition or mixing two paint colours."""
    rng = sample_rng(seed, key, 0)
    if rng.random() < 0.5:
        a, b = (int(v) for v in rng.integers(0, 10, size=2))
        return _turn(rng, ARITHMETIC, [({"a": a, "b": b}, str(a + b))])
    pairs = list(MIXES.items())
    (a, b), mixed = pairs[int(rng.integers(len(pairs)))]
    if rng.random() < 0.5:
        a, b = b, a
    return _turn(rng, MIXING, [({"a": a, "b": b}, mixed)])


def conversation_meta(turns: list[VQATurn], image: dict | None, key: str, source: str) -> dict:
    """The sample JSON: the turns as user/assistant messages (the image, if any, opens the first
    question), ``images`` (``{"width", "height", "source"}``), ``vqa_kinds``; checked like an
    imported conversation."""
    messages = []
    for i, turn in enumerate(turns):
        opening = (0,) if image is not None and i == 0 else ()
        messages += [Message("user", (*opening, turn.question)),
                     Message("assistant", (turn.answer,))]
    images = [image] if image is not None else []
    check_messages(messages, len(images))
    return validate_meta({"conversation": messages_to_json(messages), "images": images,
                          "id": key, "source": source,
                          "vqa_kinds": [turn.kind for turn in turns]})


@dataclasses.dataclass
class VQASummary:
    """What ``write_vqa_shards`` wrote (skips are in its ``BadSampleCounter``)."""

    shards: list[Path] = dataclasses.field(default_factory=list)
    conversations: int = 0
    images: int = 0
    text_only: int = 0
    questions: Counter = dataclasses.field(default_factory=Counter)  # per kind

    def line(self) -> str:
        kinds = ", ".join(f"{kind} {self.questions[kind]}" for kind in VQA_KINDS + TEXT_KINDS
                          if self.questions[kind])
        return (f"{self.conversations} conversations ({self.images} with an image, "
                f"{self.text_only} text-only; questions: {kinds or 'none'}) in "
                f"{len(self.shards)} shards")


def write_vqa_shards(source_dir: str | Path, out_dir: str | Path, split: str = "train",
                     seed: int = 0, max_samples: int | None = None, prefix: str = "vqa",
                     samples_per_shard: int = 256, counter: BadSampleCounter | None = None,
                     progress: bool = True) -> VQASummary:
    """Conversation shards in ``out_dir`` from the FineCap-mini shards of ``source_dir`` (the
    first ``max_samples`` usable images, shard order; keys kept, text-only samples keyed
    ``text-NNNNNNNN``). Not indexed here (``data.index.build_index``)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} not in {SPLITS}")
    counter = counter if counter is not None else BadSampleCounter(name="make_synthetic_vqa")
    summary = VQASummary()
    bar = tqdm(total=max_samples, desc=f"vqa {split}", unit="img", disable=not progress)
    with ShardWriter(out_dir, prefix=prefix, max_samples_per_shard=samples_per_shard) as writer:
        for shard, key, ext, image_bytes, meta in _source_records(source_dir, counter):
            if max_samples is not None and summary.images >= max_samples:
                break
            try:
                turns = image_turns(meta, split, seed, key)
                image = {"width": meta["width"], "height": meta["height"],
                         "source": meta.get("source", key)}
                sample = conversation_meta(turns, image, key, f"{shard}:{key}")
            except BadSampleError as err:
                counter.skip_error(err, shard=shard, member=key)
                continue
            writer.write_images(key, [(image_bytes, ext)], sample)
            counter.ok()
            bar.update()
            _count(summary, turns, with_image=True)
            if split == "train" and summary.images % TEXT_ONLY_EVERY == 0:
                text_key = f"text-{summary.text_only:08d}"
                turn = text_only_turn(seed, text_key)
                writer.write_images(text_key, [], conversation_meta(
                    [turn], None, text_key, f"synthetic:{text_key}"))
                _count(summary, [turn], with_image=False)
    bar.close()
    summary.shards = writer.written_shards
    logger.info("wrote %s to %s; %s", summary.line(), out_dir, counter.summary())
    return summary


def _source_records(source_dir, counter: BadSampleCounter):
    """``(shard name, key, image ext, image bytes, meta)`` of every usable source sample."""
    for shard in list_shards(source_dir):
        for key, ext, image_bytes, meta, _ in iter_shard_records(shard, counter):
            yield shard.name, key, ext, image_bytes, meta


def _count(summary: VQASummary, turns: list[VQATurn], with_image: bool) -> None:
    summary.conversations += 1
    summary.images += with_image
    summary.text_only += not with_image
    summary.questions.update(turn.kind for turn in turns)
