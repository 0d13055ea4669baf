"""SFT conversations as stored in shards: the normalised JSON form, its rules, and its tokens.

A conversation sample's JSON (``tools/import_conversations.py`` writes it; ``data/shards.py``
stores the sample's images as its image members, in order)::

    {"conversation": [{"role": "system" | "user" | "assistant",
                       "content": [{"text": str} | {"image": int}, ...]}, ...],
     "images": [{"width": int, "height": int, "source": str}, ...],   # 0..n, in order of use
     "id": str, "source": "FILE:RECORD"}

``{"image": i}`` places image ``i`` (its vision block) at that point of the text. Rules
(``check_messages``), applied on import and again on read: an optional system message first,
then user and assistant messages alternating, from a user message to an assistant message; no
empty message (an image alone makes a user message); images only in user messages, each shown
once, in order 0..n-1. A broken sample raises ``BadSampleError`` with the reason counted.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_finevit.data.bad_samples import BadSampleError
from megatron_finevit.data.resize import ResizePolicy, num_patches
from megatron_finevit.data.tasks.chat import (ROLES, EncodedConversation, Message,
                                              Qwen3ChatTemplate)


def check_messages(messages: Sequence[Message], num_images: int) -> None:
    """Raise BadSampleError ("bad_role", "roles_not_alternating", "empty_turn",
    "image_outside_user_turn" or "image_count_mismatch") unless ``messages`` follow the rules."""
    for message in messages:
        if message.role not in ROLES:
            raise BadSampleError("bad_role", f"role {message.role!r} not in {ROLES}")
    dialogue = messages[1:] if messages and messages[0].role == "system" else messages
    roles = [m.role for m in dialogue]
    expected = ["user", "assistant"] * (len(roles) // 2)
    if not roles or roles != expected:
        raise BadSampleError("roles_not_alternating",
                             f"roles {[m.role for m in messages]}: want [system,] then user, "
                             "assistant, user, ..., assistant")
    for position, message in enumerate(dialogue):
        if not message.text.strip() and (message.role == "assistant" or not message.images):
            raise BadSampleError("empty_turn", f"{message.role} message {position} is empty")
        if message.images and message.role != "user":
            raise BadSampleError("image_outside_user_turn", f"an image in a {message.role} turn")
    shown = [i for m in messages for i in m.images]
    if shown != list(range(num_images)):
        raise BadSampleError("image_count_mismatch",
                             f"the text shows images {shown}; the sample has {num_images}")


def messages_to_json(messages: Sequence[Message]) -> list[dict]:
    """The ``conversation`` field of the sample JSON."""
    return [{"role": m.role, "content": [{"image": p} if isinstance(p, int) else {"text": p}
                                         for p in m.content]} for m in messages]


def messages_from_meta(meta: dict) -> list[Message]:
    """The checked messages of a conversation sample's JSON (BadSampleError if broken)."""
    turns = meta.get("conversation")
    try:
        messages = [Message(t["role"], tuple(_piece(p) for p in t["content"])) for t in turns]
    except (TypeError, KeyError, ValueError) as err:
        raise BadSampleError("invalid_meta", f"malformed conversation: {err!r}") from None
    check_messages(messages, len(meta.get("images", [])))
    return messages


def _piece(piece: dict) -> str | int:
    if set(piece) == {"text"} and isinstance(piece["text"], str):
        return piece["text"]
    if set(piece) == {"image"} and type(piece["image"]) is int:
        return piece["image"]
    raise ValueError(f"content piece {piece!r}")


def image_token_counts(meta: dict, policy: ResizePolicy) -> list[int]:
    """LLM tokens of each image: its 2×2 merge windows after resizing under ``policy``.
    (Counted as patches of twice the side, so that the importer, which checks conversations
    with this module, does not import the model code behind ``multimodal.MERGE_WINDOW``.)"""
    return [num_patches(*policy.target_size(image["height"], image["width"]),
                        patch_size=2 * policy.patch_size) for image in meta.get("images", [])]


def encode_conversation(template: Qwen3ChatTemplate, meta: dict, policy: ResizePolicy
                        ) -> EncodedConversation:
    """Tokens and loss mask of a conversation sample (see ``Qwen3ChatTemplate``)."""
    return template.encode_messages(messages_from_meta(meta), image_token_counts(meta, policy))
