"""Import public conversation data (LLaVA / ShareGPT and ``messages`` forms) into shards.

Input: a JSON list of records, or JSONL (one record per line); the form is told by the first
non-blank character (``[``: a list). Each record is one of

    LLaVA:    {"id": ..., "image": "a.jpg" | ["a.jpg", "b.jpg"] (optional),
               "conversations": [{"from": "human" | "gpt" | "system", "value": "...<image>..."}]}
    messages: {"messages": [{"role": "user" | "assistant" | "system",
                             "content": "...<image>..." | [{"type": "image", "image": "a.jpg"}
                                                           | {"type": "text", "text": "..."}]}],
               "images": ["a.jpg", ...] (optional)}

Image paths are relative to the images folder. Each ``<image>`` placeholder (and each
``{"type": "image"}`` item without a path) takes the next listed image; their number must match
the images listed. Records become the normalised form of ``data/tasks/conversation.py`` with the
image files stored unchanged, in order of use (text-only records: no image member).

Skipped and counted per reason (``BadSampleCounter``: the import aborts past the bad fraction):
invalid JSON / non-UTF-8 lines, records of neither form or with wrong types ("invalid_meta"),
the conversation rules ("bad_role", "roles_not_alternating", "empty_turn", ...), placeholder
and image counts that disagree ("image_count_mismatch"), and images that are missing, outside
the images folder, corrupt or of an unsupported format (``read_image_file``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from megatron_finevit.config.errors import UserError
from megatron_finevit.data.bad_samples import BadSampleCounter, BadSampleError
from megatron_finevit.data.decode_pil import DEFAULT_MAX_DECODE_PIXELS
from megatron_finevit.data.jsonl_import import read_image_file
from megatron_finevit.data.shards import ShardWriter, validate_meta
from megatron_finevit.data.tasks.chat import Message
from megatron_finevit.data.tasks.conversation import check_messages, messages_to_json

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
               "assistant": "assistant"}


@dataclasses.dataclass
class ImportSummary:
    """What an import wrote (skips are in its ``BadSampleCounter``)."""

    shards: list[Path] = dataclasses.field(default_factory=list)
    conversations: int = 0
    text_only: int = 0
    multi_image: int = 0
    images: int = 0
    assistant_turns: int = 0

    def line(self) -> str:
        return (f"{self.conversations} conversations ({self.text_only} text-only, "
                f"{self.multi_image} multi-image, {self.images} images, {self.assistant_turns} "
                f"assistant turns) in {len(self.shards)} shards")


class _ImageList:
    """The record's images in order of use: placeholders draw from its listed paths in turn,
    ``{"type": "image", "image": path}`` items bring their own."""

    def __init__(self, listed):
        if isinstance(listed, str):
            listed = [listed]
        if not isinstance(listed, list):
            raise BadSampleError("invalid_meta", f"images must be a path or a list, not {listed!r}")
        self.listed, self.paths, self.drawn = listed, [], 0

    def add(self, path) -> int:
        """Index of a newly used image."""
        if not isinstance(path, str):
            raise BadSampleError("invalid_meta", f"image path {path!r} is not a string")
        self.paths.append(path)
        return len(self.paths) - 1

    def next_listed(self) -> int:
        if self.drawn == len(self.listed):
            raise BadSampleError("image_count_mismatch",
                                 f"more placeholders than the {len(self.listed)} listed images")
        self.drawn += 1
        return self.add(self.listed[self.drawn - 1])

    def check_all_used(self) -> None:
        if self.drawn != len(self.listed):
            raise BadSampleError("image_count_mismatch",
                                 f"{len(self.listed)} images listed, {self.drawn} placeholders")

    def split(self, text) -> list[str | int]:
        """``text`` with each placeholder replaced by the index of the next listed image."""
        if not isinstance(text, str):
            raise BadSampleError("invalid_meta", f"text {text!r} is not a string")
        parts = text.split(IMAGE_PLACEHOLDER)
        pieces = [parts[0]]
        for part in parts[1:]:
            pieces += [self.next_listed(), part]
        return pieces


def parse_record(record) -> tuple[list[Message], list[str]]:
    """A record of either form → (messages, image paths in order of use). Raises
    BadSampleError for every broken record (module docstring)."""
    if not isinstance(record, dict):
        raise BadSampleError("invalid_meta", f"record is {type(record).__name__}, not an object")
    if isinstance(record.get("conversations"), list):
        images = _ImageList(record.get("image", []))
        messages = [_llava_message(turn, images) for turn in record["conversations"]]
    elif isinstance(record.get("messages"), list):
        images = _ImageList(record.get("images", []))
        messages = [_chat_message(message, images) for message in record["messages"]]
    else:
        raise BadSampleError("invalid_meta", 'record has no "conversations" or "messages" list')
    images.check_all_used()
    check_messages(messages, len(images.paths))
    return messages, images.paths


def _llava_message(turn, images: _ImageList) -> Message:
    if not isinstance(turn, dict):
        raise BadSampleError("invalid_meta", f"turn {turn!r} is not an object")
    role = turn.get("from")
    if role not in LLAVA_ROLES:
        raise BadSampleError("bad_role", f"from={role!r} not in {sorted(LLAVA_ROLES)}")
    return Message(LLAVA_ROLES[role], tuple(images.split(turn.get("value"))))


def _chat_message(message, images: _ImageList) -> Message:
    if not isinstance(message, dict):
        raise BadSampleError("invalid_meta", f"message {message!r} is not an object")
    content = message.get("content")
    if isinstance(content, str):
        pieces = images.split(content)
    elif isinstance(content, list):
        pieces = [p for item in content for p in _content_item(item, images)]
    else:
        raise BadSampleError("invalid_meta", f"content {content!r} is not a string or a list")
    return Message(str(message.get("role")), tuple(pieces))


def _content_item(item, images: _ImageList) -> list[str | int]:
    kind = item.get("type") if isinstance(item, dict) else None
    if kind == "text":
        return images.split(item.get("text"))
    if kind == "image":
        return [images.add(item["image"]) if "image" in item else images.next_listed()]
    raise BadSampleError("invalid_meta", f"content item {item!r}: want type text or image")


def iter_records(path: Path) -> Iterator[tuple[int, object]]:
    """``(record number from 1, record)`` of a JSON list or JSONL file; a broken JSONL line
    gives a BadSampleError as its record. Raises UserError if a JSON list does not parse."""
    with open(path, "rb") as file:
        head = file.read(4096).lstrip()
    if head.startswith(b"["):
        try:
            records = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"INPUT {path} starts like a JSON list but is not valid JSON: "
                            f"{err}") from None
        yield from enumerate(records, start=1)
        return
    with open(path, "rb") as lines:
        for line_no, raw in enumerate(lines, start=1):
            if raw.strip():
                yield line_no, _parse_line(raw)


def _parse_line(raw: bytes):
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return BadSampleError("non_utf8", str(err))
    except json.JSONDecodeError as err:
        return BadSampleError("invalid_json", str(err))


def import_conversations(source: str | Path, images_dir: str | Path, out_dir: str | Path,
                         prefix: str = "conversations", samples_per_shard: int = 1000,
                         counter: BadSampleCounter | None = None,
                         max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS,
                         progress: bool = True) -> ImportSummary:
    """Convert the records of ``source`` into shards in ``out_dir`` (keys: record numbers)."""
    source, images_dir = Path(source), Path(images_dir).resolve()
    counter = counter if counter is not None else BadSampleCounter(name="import_conversations")
    summary = ImportSummary()
    with ShardWriter(out_dir, prefix=prefix, max_samples_per_shard=samples_per_shard) as writer:
        for number, record in tqdm(iter_records(source), desc="importing", unit="record",
                                   disable=not progress):
            member = f"{source.name}:{number}"
            try:
                if isinstance(record, BadSampleError):
                    raise record
                messages, paths = parse_record(record)
                files = [read_image_file(images_dir, p, max_decode_pixels) for p in paths]
                meta = validate_meta({
                    "conversation": messages_to_json(messages),
                    "images": [{"width": w, "height": h, "source": p}
                               for p, (_, _, h, w) in zip(paths, files)],
                    "id": str(record.get("id", "")), "source": member}, counter, member=member)
            except BadSampleError as err:
                counter.skip_error(err, member=member)
                continue
            writer.write_images(f"{number:09d}", [(data, ext) for data, ext, _, _ in files], meta)
            counter.ok()
            summary.conversations += 1
            summary.text_only += not files
            summary.multi_image += len(files) > 1
            summary.images += len(files)
            summary.assistant_turns += sum(m.role == "assistant" for m in messages)
    summary.shards = writer.written_shards
    logger.info("imported %s: %s in %s; %s", source, summary.line(), out_dir, counter.summary())
    return summary
