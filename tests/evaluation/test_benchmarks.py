"""The paper's benchmark adapters on tiny fixture directories written here: each importer's layout,
scoring against brute-force loops (multi-caption image → text, ReaL's multi-label top-1, skipped
images), and the CLI on a tiny Stage II checkpoint made by the train CLI (one benchmark run and a
missing data directory)."""

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from megatron_finevit.data.decode_pil import Normalization, decode_pil
from megatron_finevit.data.resize import ResizePolicy
from megatron_finevit.evaluation.benchmark_sets import (
    BENCHMARKS,
    BenchmarkDataError,
    imagenet_real,
    imagenet_v2,
    imagenet_val,
    karpathy,
    long_text,
)
from megatron_finevit.evaluation.benchmarks import (
    Encoders,
    evaluate_zero_shot,
    imagenet_zero_shot,
    run_benchmark,
)

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """This environment without a launcher's variables (a CLI run as a user starts it)."""
    env = {k: v for k, v in os.environ.items() if k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


# --- fixtures -----------------------------------------------------------------------------------

def _image(path: Path, ident: int, size=(60, 44)) -> Path:
    """A solid image whose red channel encodes ``ident`` (read back by ``FakeEncoders``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (8 * ident, 100, 50)).save(path)
    return path


def _broken(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return path


class FakeEncoders:
    """Encoders with chosen embeddings: image ``ident`` -> ``image_emb[ident]``, text ``"t<j>"``
    (or a prompt holding a class name) -> ``text_emb[j]``. Decoding is the real PIL decoder."""

    def __init__(self, image_emb, text_emb=None, prompt_class=None, image_batch=3,
                 text_batch=4):
        self.image_emb, self.text_emb, self.prompt_class = image_emb, text_emb, prompt_class
        self.texts_seen: list[str] = []
        mean = Normalization().mean[0] * 255
        std = Normalization().std[0] * 255

        def embed_images(images):
            assert len(images) <= image_batch
            idents = [round((img[0].mean().item() * std + mean) / 8) for img in images]
            return self.image_emb[idents]

        def embed_texts(texts):
            self.texts_seen += texts
            if prompt_class is not None:
                return self.text_emb[[prompt_class[t] for t in texts]]
            return self.text_emb[[int(t[1:]) for t in texts]]

        self.encoders = Encoders(decode=lambda data: decode_pil(data, ResizePolicy()),
                                 embed_images=embed_images, embed_texts=embed_texts,
                                 image_batch=image_batch, text_batch=text_batch)


def _rank_hits(scores_row: np.ndarray, correct: set, k: int) -> bool:
    """Brute force: is any correct candidate among the top ``k`` (ties against the query)?"""
    best = max(scores_row[c] for c in correct)
    wrong_above = sum(1 for j, s in enumerate(scores_row) if j not in correct and s >= best)
    return wrong_above < k


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --- importers ----------------------------------------------------------------------------------

def test_imagenet_val_synset_folders_and_flat_val_txt(tmp_path):
    folders = tmp_path / "folders"
    for synset, n in (("n02000000", 2), ("n01000000", 1), ("n03000000", 1)):
        for i in range(n):
            _image(folders / synset / f"ILSVRC2012_val_{synset}_{i}.JPEG", 1)
    (folders / "not_a_synset").mkdir()
    data = imagenet_val(folders)
    assert data.num_classes == 3
    assert [(p.parent.name, l) for p, l in zip(data.images, data.labels)] == [
        ("n01000000", [0]), ("n02000000", [1]), ("n02000000", [1]), ("n03000000", [2])]

    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "val.txt").write_text("ILSVRC2012_val_00000001.JPEG 65\n\n"
                                  "ILSVRC2012_val_00000002.JPEG 970\n")
    data = imagenet_val(flat)
    assert [p.name for p in data.images] == ["ILSVRC2012_val_00000001.JPEG",
                                             "ILSVRC2012_val_00000002.JPEG"]
    assert data.labels == [[65], [970]] and data.num_classes is None
    (flat / "val.txt").write_text("ILSVRC2012_val_00000001.JPEG n01440764\n")
    with pytest.raises(BenchmarkDataError, match=r"val.txt:1: expected 'filename label'"):
        imagenet_val(flat)
    with pytest.raises(BenchmarkDataError, match="neither synset folders"):
        imagenet_val(tmp_path / "folders" / "not_a_synset")


def test_imagenet_v2_folders_named_by_class(tmp_path):
    for label in (0, 10, 2):
        _image(tmp_path / str(label) / "a.jpeg", 1)
    data = imagenet_v2(tmp_path)
    assert sorted(l for (l,) in data.labels) == [0, 2, 10]
    assert all(int(p.parent.name) == l for p, (l,) in zip(data.images, data.labels))
    (tmp_path / "extra").mkdir()
    with pytest.raises(BenchmarkDataError, match="named 0 ... 999"):
        imagenet_v2(tmp_path)


def test_imagenet_real_order_and_excluded_images(tmp_path):
    # synset folders: ReaL's order is the file names', not the folders'
    names = {"n02000000": ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000004.JPEG"],
             "n01000000": ["ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000003.JPEG"]}
    for synset, files in names.items():
        for name in files:
            _image(tmp_path / synset / name, 1)
    (tmp_path / "real.json").write_text(json.dumps([[5], [], [1, 7], [3]]))
    data = imagenet_real(tmp_path)
    assert [p.name[-6:-5] for p in data.images] == ["1", "3", "4"]  # image 2 has no labels
    assert data.labels == [[5], [1, 7], [3]]
    (tmp_path / "real.json").write_text(json.dumps([[5], [1]]))
    with pytest.raises(BenchmarkDataError, match="holds 4 images but real.json lists 2"):
        imagenet_real(tmp_path)
    (tmp_path / "real.json").unlink()
    with pytest.raises(BenchmarkDataError, match="has no real.json"):
        imagenet_real(tmp_path)


def test_karpathy_splits(tmp_path):
    def entry(name, split, n, **extra):
        return {"filename": name, "split": split,
                "sentences": [{"raw": f" {name} caption {i} "} for i in range(n)], **extra}

    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [
        entry("a.jpg", "test", 6, filepath="val2014"), entry("b.jpg", "train", 5,
                                                             filepath="train2014"),
        entry("c.jpg", "test", 5, filepath="val2014")]}))
    data = BENCHMARKS["coco"].load(tmp_path)
    assert data.images == [tmp_path / "val2014" / "a.jpg", tmp_path / "val2014" / "c.jpg"]
    assert len(data.captions) == 10 and data.caption_image == [0] * 5 + [1] * 5  # 5 per image
    assert data.captions[0] == "a.jpg caption 0"
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": [
        entry("1.jpg", "test", 5), entry("2.jpg", "val", 5)]}))
    assert BENCHMARKS["flickr30k"].load(tmp_path).images == [
        tmp_path / "flickr30k-images" / "1.jpg"]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [{"split": "test"}]}))
    with pytest.raises(BenchmarkDataError, match="image 0 needs 'filename' and 'sentences'"):
        BENCHMARKS["coco"].load(tmp_path)
    with pytest.raises(BenchmarkDataError, match="no dataset_x.json"):
        karpathy("dataset_x.json", "")(tmp_path)


def test_long_text_folders_and_jsonl(tmp_path):
    folders = tmp_path / "urban"
    for stem in ("2", "10"):
        _image(folders / "image" / f"{stem}.jpg", 1)
        (folders / "caption").mkdir(exist_ok=True)
        (folders / "caption" / f"{stem}.txt").write_text(f"a long caption {stem}\n")
    data = long_text(folders)
    assert [p.name for p in data.images] == ["10.jpg", "2.jpg"]
    assert data.captions == ["a long caption 10", "a long caption 2"]
    assert data.caption_image == [0, 1]
    (folders / "caption" / "2.txt").unlink()
    with pytest.raises(BenchmarkDataError, match="has no caption file"):
        long_text(folders)
    jsonl = tmp_path / "dci"
    jsonl.mkdir()
    (jsonl / "captions.jsonl").write_text('{"image": "photos/x.jpg", "caption": "words"}\n\n'
                                          '{"image": "photos/y.jpg"}\n')
    with pytest.raises(BenchmarkDataError, match=r"captions.jsonl:3: expected a JSON object"):
        long_text(jsonl)
    (jsonl / "captions.jsonl").write_text('{"image": "photos/x.jpg", "caption": "words"}\n')
    assert long_text(jsonl).images == [jsonl / "photos" / "x.jpg"]
    with pytest.raises(BenchmarkDataError, match="neither image/"):
        long_text(tmp_path)


# --- scoring ------------------------------------------------------------------------------------

def _coco_fixture(root: Path, n_images: int, captions_per_image: int, broken=()):
    entries = []
    for i in range(n_images):
        name = f"{i}.png"
        path = root / "val2014" / name
        _broken(path) if i in broken else _image(path, i)
        entries.append({"filename": name, "filepath": "val2014", "split": "test", "sentences": [
            {"raw": f"t{i * captions_per_image + c}"} for c in range(captions_per_image)]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries}))


def test_retrieval_matches_brute_force_and_skips_broken_images(tmp_path):
    n, per = 9, 5
    _coco_fixture(tmp_path, n, per, broken={4})
    gen = torch.Generator().manual_seed(0)
    image_emb = torch.randn(n, 6, generator=gen)
    text_emb = image_emb.repeat_interleave(per, 0) + 1.2 * torch.randn(n * per, 6, generator=gen)
    got = run_benchmark("coco", tmp_path, FakeEncoders(image_emb, text_emb).encoders)

    kept = [i for i in range(n) if i != 4]  # image 4 is unreadable: it and its captions go
    captions = [j for j in range(n * per) if j // per in kept]
    scores = _unit(image_emb[kept]) @ _unit(text_emb[captions]).T  # [images, captions]
    for k in (1, 5, 10):
        i2t = [_rank_hits(scores[r], {c for c, j in enumerate(captions) if j // per == i}, k)
               for r, i in enumerate(kept)]
        t2i = [_rank_hits(scores[:, c], {kept.index(j // per)}, k) for c, j in enumerate(captions)]
        assert got[f"i2t_r{k}"] == pytest.approx(np.mean(i2t), abs=1e-12)
        assert got[f"t2i_r{k}"] == pytest.approx(np.mean(t2i), abs=1e-12)
    assert 0 < got["i2t_r1"] < 1 and 0 < got["t2i_r1"] < got["t2i_r5"] < 1  # non-trivial
    assert (got["num_images"], got["num_captions"]) == (8, 40)
    assert got["skipped_images"] == got["skipped_corrupt_image"] == 1


def test_image_to_text_counts_any_caption(tmp_path):
    """Two images, two captions each; image 0's first caption is closer to image 1. Any-caption
    scoring gives image 0 a hit (its second caption ranks first); scoring image 0 by its first
    caption alone would miss: R@1 1.0 against 0.5."""
    _coco_fixture(tmp_path, 2, 2)
    image_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text_emb = torch.tensor([[0.3, 1.0], [1.0, 0.1], [0.0, 1.0], [0.2, 1.0]])
    got = run_benchmark("coco", tmp_path, FakeEncoders(image_emb, text_emb).encoders)
    assert got["i2t_r1"] == 1.0
    scores = _unit(image_emb) @ _unit(text_emb).T
    first_only = np.mean([_rank_hits(scores[i], {2 * i}, 1) for i in range(2)])  # caption 0, 2
    assert first_only == 0.5
    assert got["t2i_r1"] == 0.75  # caption 0 retrieves image 1


def test_real_multilabel_top1_and_excluded_images(tmp_path):
    """ReaL: image 1's plain label is class 1 but the prediction (class 2) is in its set, so
    ReaL counts it where plain top-1 does not; image 2 has no labels and is excluded; image 3's
    prediction is in neither. Classes are orthonormal, images point at one class each."""
    classes = ["cat", "dog", "car", "tree"]
    files = [f"ILSVRC2012_val_0000000{i}.JPEG" for i in range(4)]
    for i, name in enumerate(files):
        _image(tmp_path / name, i)
    (tmp_path / "val.txt").write_text("".join(f"{f} {l}\n" for f, l in zip(files, (0, 1, 3, 3))))
    (tmp_path / "real.json").write_text(json.dumps([[0], [1, 2], [], [0, 3]]))
    predicted = [0, 2, 1, 1]  # the class each image's embedding points at
    image_emb = torch.eye(4)[predicted] + 0.1
    prompts = {t.format(c): i for i, c in enumerate(classes) for t in ("a {}.", "the {}")}
    fake = FakeEncoders(image_emb, torch.eye(4), prompt_class=prompts)
    real = evaluate_zero_shot(imagenet_real(tmp_path), fake.encoders, classes, ("a {}.", "the {}"))
    plain = evaluate_zero_shot(imagenet_val(tmp_path), fake.encoders, classes, ("a {}.", "the {}"))
    # brute force: the argmax is in the image's label set
    labels = {0: [0], 1: [1, 2], 3: [0, 3]}
    scores = _unit(image_emb) @ np.eye(4)
    brute = np.mean([int(np.argmax(scores[i])) in labels[i] for i in labels])
    assert real["top1"] == brute == 2 / 3
    assert real["num_images"] == 3 and plain["num_images"] == 4
    assert plain["top1"] == 1 / 4  # plain labels 0, 1, 3, 3: only image 0 is right


def test_imagenet_v2_with_open_clip_names_and_templates(tmp_path):
    """The whole zero-shot path on 1,000 classes: each prompt embeds as its class's one-hot
    (classes sharing a name share a vector); the images' known answer is 2 of 3 right."""
    names, templates = imagenet_zero_shot()
    assert len(names) == 1000 and len(templates) == 80 and templates[0] == "a bad photo of a {}."
    assert names[:3] == ["tench", "goldfish", "great white shark"]
    first = {}
    for index, name in enumerate(names):
        first.setdefault(name, index)
    prompts = {t.format(name): first[name] for name in names for t in templates}
    for ident, label in enumerate((7, 300, 999)):
        _image(tmp_path / str(label) / f"{ident}.png", ident)
    predicted = [7, 300, 998]
    # the image's own class second: a top-5 hit where top-1 misses
    image_emb = torch.eye(1000)[predicted] + 0.5 * torch.eye(1000)[[7, 300, 999]]
    fake = FakeEncoders(image_emb, torch.eye(1000), prompt_class=prompts, text_batch=4000)
    got = run_benchmark("imagenet_v2", tmp_path, fake.encoders)
    assert got["top1"] == pytest.approx(2 / 3) and got["top5"] == 1.0
    assert len(fake.texts_seen) == 80_000


def test_every_image_unreadable_is_a_user_error(tmp_path):
    (tmp_path / "image").mkdir()
    (tmp_path / "caption").mkdir()
    _broken(tmp_path / "image" / "0.jpg")
    (tmp_path / "caption" / "0.txt").write_text("x")
    with pytest.raises(BenchmarkDataError, match=r"none of the 1 images could be read"):
        run_benchmark("urban1k", tmp_path, FakeEncoders(torch.eye(2), torch.eye(2)).encoders)


# --- the CLI on a tiny Stage II checkpoint ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A one-step tiny Stage II run of the train CLI (synthetic shards, a caption tokenizer)."""
    from megatron_finevit.data.index import build_index
    from megatron_finevit.data.synthetic import make_synthetic_shards
    from megatron_finevit.testing.stage_assets import _tool, tiny_run

    root = tmp_path_factory.mktemp("bench_ckpt")
    make_synthetic_shards(root / "train", 8, samples_per_shard=8, progress=False)
    build_index(root / "train", progress=False)
    _tool("train_caption_tokenizer").train_caption_tokenizer(root / "train", root / "tok.model")
    cfg = tiny_run("contrastive", {"train": str(root / "train"),
                                   "tokenizer": str(root / "tok.model")}, steps=1, global_batch=1)
    cfg.checkpoint.dir = str(root / "ckpt")
    (root / "run.yaml").write_text(yaml.safe_dump(asdict(cfg)))
    proc = subprocess.run([sys.executable, "-m", "megatron_finevit.train", "--config",
                           str(root / "run.yaml")], cwd=ROOT, capture_output=True, text=True,
                          env=clean_env(MASTER_PORT=str(free_port())), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "ckpt"


def _evaluate(checkpoint, *args):
    return subprocess.run([sys.executable, "-m", "megatron_finevit.evaluate", "--checkpoint",
                           str(checkpoint), *args], cwd=ROOT, capture_output=True, text=True,
                          env=clean_env(MASTER_PORT=str(free_port())), timeout=300)


def test_cli_benchmark_on_tiny_checkpoint(tiny_checkpoint, tmp_path):
    data = tmp_path / "urban1k"
    for i in range(5):
        _image(data / "image" / f"{i}.jpg", 3 * i, size=(90 + 20 * i, 70))
        (data / "caption").mkdir(exist_ok=True)
        (data / "caption" / f"{i}.txt").write_text(f"a red circle and a blue square {i} " * 40)
    _broken(data / "image" / "5.jpg")
    (data / "caption" / "5.txt").write_text("broken")
    proc = _evaluate(tiny_checkpoint, "--benchmark", "urban1k", "--data", str(data),
                     "--json", str(tmp_path / "out.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "out.json").read_text())
    assert (metrics["num_images"], metrics["num_captions"], metrics["skipped_images"]) == (5, 5, 1)
    assert all(0 <= metrics[f"{d}_r{k}"] <= 1 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert metrics["i2t_r5"] == metrics["t2i_r5"] == 1.0  # 5 candidates
    assert ("urban1k retrieval over 5 images / 5 captions; 1 skipped (corrupt_image=1)"
            in proc.stdout)


def test_cli_benchmark_missing_data_dir(tiny_checkpoint, tmp_path):
    proc = _evaluate(tiny_checkpoint, "--benchmark", "coco", "--data", f"{tmp_path}/coco")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"config error: --data={tmp_path}/coco: no such directory"]
