"""tools/import_conversations.py: both input forms (JSON list and JSONL; multi-image, text-only,
multi-turn) into shards whose images keep their order and an index with the right counts; every
kind of bad record skipped and counted; the CLI as a user runs it (report, exit codes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from megatron_finevit.data.bad_samples import BadSampleCounter
from megatron_finevit.data.conversation_import import import_conversations
from megatron_finevit.data.index import build_index, load_index
from megatron_finevit.data.shards import iter_shard_samples, list_shards
from megatron_finevit.data.tasks.chat import Message
from megatron_finevit.data.tasks.conversation import messages_from_meta

REPO = Path(__file__).resolve().parents[3]
# file: (size, format); 112×56 has 32 patches after resizing, 56×56 has 16.
IMAGES = {"red.jpg": ((112, 56), "JPEG"), "blue.png": ((56, 56), "PNG"),
          "sub/green.webp": ((56, 56), "WEBP")}


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    for name, (size, fmt) in IMAGES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, name.split("/")[-1].split(".")[0]).save(folder / name, fmt)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "outside.jpg").write_bytes((folder / "red.jpg").read_bytes())
    return folder


def read_back(out: Path) -> list[tuple[list[Message], list[bytes], dict]]:
    return [(messages_from_meta(meta), [data for _, data in imgs], meta)
            for shard in list_shards(out) for _, imgs, meta, _ in iter_shard_samples(shard)]


def import_and_index(source, images, out, counter=None):
    summary = import_conversations(source, images, out, samples_per_shard=2, counter=counter,
                                   progress=False)
    build_index(out, progress=False)
    return summary, load_index(out)


LLAVA = [
    {"id": "two", "image": ["blue.png", "red.jpg"],
     "conversations": [{"from": "human", "value": "Compare <image> with <image>."},
                       {"from": "gpt", "value": "Blue, then red."}]},
    {"id": "text", "conversations": [{"from": "system", "value": "Be brief."},
                                     {"from": "human", "value": "Hi"},
                                     {"from": "gpt", "value": "Hello"},
                                     {"from": "human", "value": "Why?"},
                                     {"from": "gpt", "value": "<think>\nok\n</think>\n\nJust."}]},
    {"id": "one", "image": "sub/green.webp",
     "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"},
                       {"from": "human", "value": "<image>\nColour?"},
                       {"from": "gpt", "value": "Green."}]},
]


def test_llava_json_list(images, tmp_path):
    source = tmp_path / "llava.json"
    source.write_text(json.dumps(LLAVA, indent=1))
    summary, index = import_and_index(source, images, tmp_path / "out")
    assert (summary.conversations, summary.text_only, summary.multi_image, summary.images,
            summary.assistant_turns) == (3, 1, 1, 3, 5)
    samples = read_back(tmp_path / "out")
    assert [m for m, _, _ in samples] == [
        [Message("user", ("Compare ", 0, " with ", 1, ".")),
         Message("assistant", ("Blue, then red.",))],
        [Message("system", ("Be brief.",)), Message("user", ("Hi",)),
         Message("assistant", ("Hello",)), Message("user", ("Why?",)),
         Message("assistant", ("<think>\nok\n</think>\n\nJust.",))],
        [Message("user", ("Hi",)), Message("assistant", ("Hey",)),
         Message("user", (0, "\nColour?")), Message("assistant", ("Green.",))],
    ]
    # Images stored unchanged, in the order of their placeholders.
    assert [imgs for _, imgs, _ in samples] == [
        [(images / "blue.png").read_bytes(), (images / "red.jpg").read_bytes()], [],
        [(images / "sub/green.webp").read_bytes()]]
    assert [[(i["source"], i["width"], i["height"]) for i in meta["images"]]
            for _, _, meta in samples] == [[("blue.png", 56, 56), ("red.jpg", 112, 56)], [],
                                           [("sub/green.webp", 56, 56)]]
    assert [meta["id"] for _, _, meta in samples] == ["two", "text", "one"]
    # The index: two shards, every sample (text-only too) with its image count and patches.
    assert index.shards == ["conversations-000000.tar", "conversations-000001.tar"]
    assert index.key.tolist() == ["000000001", "000000002", "000000003"]
    assert index.num_images.tolist() == [2, 0, 1]
    assert index.num_patches.tolist() == [16 + 32, 0, 16]
    assert index.height.tolist() == [56, 0, 56]  # the first image's size


def test_messages_jsonl(images, tmp_path):
    records = [
        {"messages": [{"role": "system", "content": "You see images."},
                      {"role": "user", "content": [{"type": "image", "image": "red.jpg"},
                                                   {"type": "text", "text": "and"},
                                                   {"type": "image"}, {"type": "text",
                                                                       "text": "<image>?"}]},
                      {"role": "assistant", "content": "Three."}],
         "images": ["sub/green.webp", "blue.png"]},
        {"messages": [{"role": "user", "content": "One"}, {"role": "assistant", "content": "1"},
                      {"role": "user", "content": [{"type": "text", "text": "Two"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "2"}]}]},
    ]
    source = tmp_path / "chat.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    summary, index = import_and_index(source, images, tmp_path / "out")
    assert (summary.conversations, summary.text_only, summary.images) == (2, 1, 3)
    samples = read_back(tmp_path / "out")
    assert samples[0][0] == [Message("system", ("You see images.",)),
                             Message("user", (0, "and", 1, 2, "?")),
                             Message("assistant", ("Three.",))]
    assert samples[0][1] == [(images / n).read_bytes()
                             for n in ("red.jpg", "sub/green.webp", "blue.png")]
    assert samples[1][0] == [Message("user", ("One",)), Message("assistant", ("1",)),
                             Message("user", ("Two",)), Message("assistant", ("2",))]
    assert index.num_images.tolist() == [3, 0]
    assert index.num_patches.tolist() == [32 + 16 + 16, 0]


def llava(value: str, answer: str = "A.", image=None, human: str = "human") -> dict:
    record = {"conversations": [{"from": human, "value": value}, {"from": "gpt", "value": answer}]}
    return record if image is None else {**record, "image": image}


BAD_RECORDS = {  # reason: JSONL line
    "invalid_json": "{broken",
    "invalid_meta": json.dumps({"conversations": "not a list"}),
    "bad_role": json.dumps(llava("Hi", human="robot")),
    "empty_turn": json.dumps(llava("Hi", answer="  ")),
    "roles_not_alternating": json.dumps({"conversations": [{"from": "human", "value": "Hi"},
                                                           {"from": "human", "value": "Hi"}]}),
    "missing_image": json.dumps(llava("<image>", image="nowhere.jpg")),
    "corrupt_image": json.dumps(llava("<image>", image="broken.jpg")),
    "unsafe_path": json.dumps(llava("<image>", image="../outside.jpg")),
    "image_count_mismatch": json.dumps(llava("<image> and <image>", image="red.jpg")),
    "image_outside_user_turn": json.dumps(llava("Hi", answer="See <image>", image="red.jpg")),
}


def test_bad_records_are_skipped_and_counted(images, tmp_path):
    lines = [json.dumps(llava("<image>Hi", image="red.jpg")), *BAD_RECORDS.values(),
             json.dumps(llava("Placeholders without images: <image>")),
             json.dumps(llava("An image without a placeholder", image="blue.png")),
             json.dumps(llava("Ok"))]
    source = tmp_path / "mixed.jsonl"
    source.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    counter = BadSampleCounter(min_samples=10_000)
    summary = import_conversations(source, images, tmp_path / "out", counter=counter,
                                   progress=False)
    assert summary.conversations == counter.good == 2
    assert counter.skipped == {**{reason: 1 for reason in BAD_RECORDS},
                               "image_count_mismatch": 3, "non_utf8": 1}
    assert [m for m, _, _ in read_back(tmp_path / "out")] == [
        [Message("user", (0, "Hi")), Message("assistant", ("A.",))],
        [Message("user", ("Ok",)), Message("assistant", ("A.",))]]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/import_conversations.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_reports_and_indexes(images, tmp_path):
    source = tmp_path / "data.jsonl"
    source.write_text("\n".join([json.dumps(r) for r in LLAVA] + ["{broken"]) + "\n")
    proc = run_tool(str(source), "--images", str(images), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("imported 3 conversations (1 text-only, 1 multi-image, "
                                  "3 images, 5 assistant turns) in 1 shards into ")
    assert "3 good samples, 1 skipped (25.00%; invalid_json=1)" in proc.stdout
    assert "skipped sample (invalid_json)" in proc.stderr and "data.jsonl:4" in proc.stderr
    assert load_index(tmp_path / "out").num_images.tolist() == [2, 0, 1]


def assert_user_error(proc, start: str) -> None:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(start), proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == errors[0]


def test_cli_user_errors(images, tmp_path):
    missing = run_tool(str(tmp_path / "nope.json"), "--out", str(tmp_path / "out"))
    assert_user_error(missing, f"error: INPUT {tmp_path}/nope.json: no such file")
    assert missing.stderr.count("\n") == 1  # nothing else on stderr
    # 30 of 120 records broken: past the default 5% once 100 were seen.
    source = tmp_path / "mostly_bad.jsonl"
    good, bad = json.dumps(llava("Hi")), "{broken"
    source.write_text("\n".join([good, good, good, bad] * 30) + "\n")
    over = run_tool(str(source), "--out", str(tmp_path / "out"))
    assert_user_error(over, "error: import_conversations: too many bad samples")
    assert not (tmp_path / "out").exists() or not list_shards(tmp_path / "out")
