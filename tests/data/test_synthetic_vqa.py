"""The synthetic VQA set (``data.synthetic_vqa``, ``tools/make_synthetic_vqa.py``): every answer
re-derived from the FineCap-mini source's metadata, image bytes unchanged, determinism (the CLI
and the library write byte-identical shards for one seed), the kinds and text-only samples of
each split, the index, and the tool's user errors."""

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from megatron_finevit.data.shards import ShardWriter, iter_shard, iter_shard_samples, list_shards
from megatron_finevit.data.synthetic import COLORS, SHAPES, make_synthetic_shards
from megatron_finevit.data.synthetic_vqa import (MIXES, TEXT_ONLY_EVERY, VQA_KINDS,
                                                 write_vqa_shards)

REPO = Path(__file__).resolve().parents[2]
IMAGES = 40
TOOL = str(REPO / "tools/make_synthetic_vqa.py")


def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    make_synthetic_shards(root / "src", IMAGES, seed=5, samples_per_shard=16, progress=False)
    proc = run_tool("--source", root / "src", "--out", root / "train", "--seed", 1,
                    "--samples-per-shard", 16)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, split, seed in (("again", "train", 1), ("other", "train", 2), ("eval", "eval", 1)):
        write_vqa_shards(root / "src", root / name, split, seed, samples_per_shard=16,
                         progress=False)
    source = {key: (image, meta) for path in list_shards(root / "src")
              for key, image, meta in iter_shard(path)}
    return root, source, proc.stdout


def samples(directory):
    return [(key, images, meta) for path in list_shards(directory)
            for key, images, meta, _ in iter_shard_samples(path)]


def turns(meta):
    """(kind, question, answer) per turn, and whether the first question shows image 0."""
    conversation = meta["conversation"]
    assert [m["role"] for m in conversation] == ["user", "assistant"] * len(meta["vqa_kinds"])
    questions = [m["content"][-1]["text"] for m in conversation[::2]]
    answers = [m["content"][0]["text"] for m in conversation[1::2]]
    shows_image = conversation[0]["content"][0] == {"image": 0}
    return list(zip(meta["vqa_kinds"], questions, answers)), shows_image


def allowed_kinds(meta):
    """The kinds the ground truth allows, derived here from the source's metadata."""
    labels = Counter(region["label"] for region in meta["regions"])
    return [kind for kind, ok in (("count", True), ("color", 1 in labels.values()),
                                  ("read", len(meta["ocr"]) == 1)) if ok]


def check_answer(kind, question, answer, meta):
    if kind == "count":
        assert answer == str(len(meta["regions"])), question
    elif kind == "color":
        (shape,) = [s for s in SHAPES if s in question]
        (region,) = [r for r in meta["regions"] if r["label"] == shape]  # unique in the image
        assert region["caption"] == f"{'an' if answer[0] in 'aeiou' else 'a'} {answer} {shape}"
        assert answer in COLORS
    else:
        assert [o["text"] for o in meta["ocr"]] == [answer]


@pytest.mark.parametrize("split", ["train", "eval"])
def test_answers_follow_the_source_metadata(sets, split):
    root, source, _ = sets
    written = [s for s in samples(root / split) if not s[0].startswith("text-")]
    assert [key for key, _, _ in written] == list(source)  # every image, in source order
    for key, images, meta in written:
        image_bytes, truth = source[key]
        assert [data for _, data in images] == [image_bytes]  # stored unchanged
        assert [(i["width"], i["height"]) for i in meta["images"]] == [(truth["width"],
                                                                        truth["height"])]
        asked, shows_image = turns(meta)
        assert shows_image
        for kind, question, answer in asked:
            check_answer(kind, question, answer, truth)
        kinds = [kind for kind, _, _ in asked]
        if split == "eval":
            assert kinds == allowed_kinds(truth)
        else:
            assert 1 <= len(kinds) <= 3 and len(set(kinds)) == len(kinds)
            assert set(kinds) <= set(allowed_kinds(truth))


def test_kinds_paraphrases_and_text_only_samples(sets):
    root, _, stdout = sets
    train, evaluation = samples(root / "train"), samples(root / "eval")
    kinds = Counter(k for _, _, meta in evaluation for k in meta["vqa_kinds"])
    assert set(kinds) == set(VQA_KINDS) and kinds["count"] == IMAGES
    questions = Counter(q for _, _, meta in train for kind, q, _ in turns(meta)[0]
                        if kind == "count")
    assert len(questions) > 1  # paraphrases
    assert max(len(meta["vqa_kinds"]) for _, _, meta in train) > 1  # multi-turn
    text_only = [(key, images, meta) for key, images, meta in train if not meta["images"]]
    assert len(text_only) == IMAGES // TEXT_ONLY_EVERY
    assert not any(not meta["images"] for _, _, meta in evaluation)
    for key, images, meta in text_only:
        assert key.startswith("text-") and images == []
        ((kind, question, answer),), shows_image = turns(meta)
        assert not shows_image
        numbers = [int(n) for n in re.findall(r"\d+", question)]
        if kind == "arithmetic":
            assert answer == str(sum(numbers)) and len(numbers) == 2
        else:
            assert kind == "mixing" and not numbers
            pair = tuple(sorted(c for c in ("red", "blue", "yellow", "black", "white")
                                if c in question))
            assert MIXES[pair] == answer
    assert f"{IMAGES + len(text_only)} conversations" in stdout


def test_same_seed_same_bytes_other_seed_differs(sets):
    root, _, _ = sets

    def tars(name):
        return [path.read_bytes() for path in list_shards(root / name)]

    assert len(tars("train")) > 1 and tars("train") == tars("again")  # the CLI and the library
    assert tars("other") != tars("train")


def test_index_builds_and_feeds_the_conversation_encoder(sets):
    from megatron_finevit.data.index import load_index
    from megatron_finevit.data.loader import SampleReader
    from megatron_finevit.data.resize import ResizePolicy
    from megatron_finevit.data.tasks.chat import Qwen3ChatTemplate
    from megatron_finevit.data.tasks.conversation import encode_conversation
    from megatron_finevit.data.tokenizers import QwenTokenizer

    root, _, _ = sets
    index = load_index(root / "train")  # the tool indexed it
    written = samples(root / "train")
    assert list(index.key) == [key for key, _, _ in written]
    assert list(index.num_images) == [len(images) for _, images, _ in written]
    template = Qwen3ChatTemplate(QwenTokenizer.from_tiktoken())
    reader = SampleReader(index)
    try:
        for row in range(len(index)):
            images, meta = reader.read_images(row)
            encoded = encode_conversation(template, meta, ResizePolicy())
            assert len(encoded.turns) == len(meta["vqa_kinds"]) and encoded.supervised.any()
            assert [t.answer for t in encoded.turns] == [a for _, _, a in turns(meta)[0]]
            assert len(images) == index.num_images[row]
    finally:
        reader.close()


def test_user_errors_exit_2_without_traceback(sets, tmp_path):
    root, _, _ = sets
    proc = run_tool("--source", tmp_path / "nowhere", "--out", root / "train")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: --source {tmp_path}/nowhere: no such directory",
        f"error: --out {root}/train already holds shards; write into a new directory"]

    with ShardWriter(tmp_path / "photos", prefix="photos") as writer:  # not FineCap-mini
        image, meta = next(iter(sets[1].values()))
        writer.write("a", image, {**meta, "regions": [{**meta["regions"][0], "label": "dog"}]})
    proc = run_tool("--source", tmp_path / "photos", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(
        f"error: --source {tmp_path}/photos holds no usable FineCap-mini sample")
    assert "not_finecap_mini=1" in proc.stderr
