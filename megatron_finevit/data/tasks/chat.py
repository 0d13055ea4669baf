"""Qwen3 chat rendering with an image: conversation turns -> text, token ids and the loss mask.

The one renderer for training sequences and evaluation prompts, so both see the same bytes.
A conversation with an image whose merge gives ``n`` LLM tokens renders as::

    <|im_start|>user
    <|vision_start|><|image_pad|>×n<|vision_end|>{question 1}<|im_end|>
    <|im_start|>assistant
    {answer 1}<|im_end|>
    <|im_start|>user
    {question 2}<|im_end|>
    <|im_start|>assistant
    {answer 2}<|im_end|>

(each line ends in ``\\n``). This is Qwen3's chat template (no default system prompt) with the
Qwen2-VL / Qwen3-VL vision block — ``<|vision_start|>``, one ``<|image_pad|>`` per 2×2 merge
window, ``<|vision_end|>`` right before the first question — which ``FineViTVLModel`` and the HF
export fill with the projected image features (``image_token_id`` = ``<|image_pad|>`` = 151655).

No ``<think>`` block. Qwen3's template writes an empty ``<think>\\n\\n</think>\\n\\n`` only into
the last assistant turn (or the generation prompt) when ``enable_thinking=False``, and strips it
from earlier turns, so a multi-turn training sequence would treat its final turn unlike the
others. Here every assistant turn starts right after ``<|im_start|>assistant\\n``, which is what
Qwen3's template renders for all earlier turns, and the evaluation prompt (``render_prompt``)
ends with exactly that header, so ``generate()`` continues as in training.

Tokens. Special tokens are inserted by id; text between them is encoded with
``allow_special=False``, so a caption cannot inject a control token. Questions and answers are
stripped of surrounding whitespace, which makes tokenizing the header ``assistant\\n`` and the
answer separately identical to tokenizing the whole rendered string (Qwen's pre-tokenizer always
splits a newline from a following non-space character; the tests check the equality).

Loss mask: the model learns each answer and the ``<|im_end|>`` that closes it (to stop); the
prompt, the image block, role headers and the newline after ``<|im_end|>`` are masked.

Conversations with any number of images (SFT, ``Message``; ``render_messages`` /
``encode_messages``) use the same pieces: an optional ``system`` message first, then user and
assistant messages, each ``<|im_start|>{role}\n{content}<|im_end|>\n``, where every image of the
content is a vision block at its own place with as many ``<|image_pad|>`` as that image has
merge windows, and text is kept verbatim (only the message's ends are stripped). Every assistant
message is learnt. A ``<think>…</think>`` block in an answer stays in the text as written (Qwen3's
template would strip it from earlier turns) and is learnt like the rest of the answer; its tags
are encoded as Qwen3's ``<think>`` / ``</think>`` ids, as Qwen's tokenizer encodes that text (the
only special-token strings that text may carry: they open and close no turn).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Sequence

import torch

from megatron_finevit.data.tokenizers import QwenTokenizer

IGNORE_INDEX = -100
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
PAD_TOKEN = "<|endoftext|>"  # fills the padding tail of a pack (always masked)
ROLES = ("system", "user", "assistant")
_THINK_TAGS = re.compile(r"(<think>|</think>)")


@dataclasses.dataclass(frozen=True)
class Turn:
    """One question and its answer; ``kind`` tags the task (for per-task loss logs)."""

    question: str
    answer: str
    kind: str = ""


@dataclasses.dataclass(frozen=True)
class Message:
    """One message of a conversation: ``role`` in ``ROLES``; ``content`` the text pieces (str)
    and images (int: index into the conversation's images) in order. Construction strips the
    ends of the content and merges adjacent text, so equal conversations compare equal."""

    role: str
    content: tuple[str | int, ...]

    def __post_init__(self):
        merged: list[str | int] = []
        for piece in self.content:
            if isinstance(piece, str) and merged and isinstance(merged[-1], str):
                merged[-1] += piece
            else:
                merged.append(piece)
        if merged and isinstance(merged[0], str):
            merged[0] = merged[0].lstrip()
        if merged and isinstance(merged[-1], str):
            merged[-1] = merged[-1].rstrip()
        object.__setattr__(self, "content", tuple(p for p in merged if p != ""))

    @property
    def text(self) -> str:
        """The text pieces joined (images left out)."""
        return "".join(p for p in self.content if isinstance(p, str))

    @property
    def images(self) -> list[int]:
        return [p for p in self.content if isinstance(p, int)]


@dataclasses.dataclass
class EncodedConversation:
    """One image's conversation as tokens.

    ids: int64 ``[L]``. supervised: bool ``[L]``, True on the tokens the model must produce
    (answers and their closing ``<|im_end|>``). answer_turn: int64 ``[L]``, index into ``turns``
    of the answer a supervised token belongs to, -1 elsewhere. turns: the turns that were kept
    (``max_tokens`` may leave some out; ``encode_messages``: one per assistant message, its
    question the user text before it). num_image_tokens: ``<|image_pad|>`` tokens in ``ids``.
    """

    ids: torch.Tensor
    supervised: torch.Tensor
    answer_turn: torch.Tensor
    turns: list[Turn]
    num_image_tokens: int

    def __len__(self) -> int:
        return len(self.ids)

    def labels(self) -> torch.Tensor:
        """int64 ``[L]`` next-token targets, already shifted: ``labels[t] = ids[t + 1]`` where
        token ``t + 1`` is supervised, else ``IGNORE_INDEX`` (the last position too). Megatron's
        GPTModel computes its loss on ``logits[t]`` against ``labels[t]``, so these go in
        aligned with ``ids``."""
        labels = torch.full_like(self.ids, IGNORE_INDEX)
        labels[:-1] = torch.where(self.supervised[1:], self.ids[1:], IGNORE_INDEX)
        return labels

    def label_turns(self) -> torch.Tensor:
        """int64 ``[L]``: the turn of ``labels[t]`` (``answer_turn`` shifted like the labels)."""
        turns = torch.full_like(self.answer_turn, -1)
        turns[:-1] = self.answer_turn[1:]
        return turns


# A piece of a rendered conversation: (text, is a special token, supervised).
_Piece = tuple[str, bool, bool]


class Qwen3ChatTemplate:
    """Renders and tokenizes conversations (see the module docstring for the format)."""

    def __init__(self, tokenizer: QwenTokenizer):
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.token_id(IMAGE_PAD)
        self.pad_id = tokenizer.token_id(PAD_TOKEN)

    # --- the format (one place) --------------------------------------------------------------

    @staticmethod
    def _message_pieces(message: Message, image_tokens: Sequence[int]) -> Iterator[_Piece]:
        """Pieces of one message; image ``i`` of the content gets ``image_tokens[i]`` pads.
        Assistant messages are learnt, their header and trailing newline are not."""
        learn = message.role == "assistant"
        yield IM_START, True, False
        yield f"{message.role}\n", False, False
        for piece in message.content:
            if isinstance(piece, str):
                yield piece, False, learn
            else:
                yield VISION_START, True, False
                yield from ((IMAGE_PAD, True, False) for _ in range(image_tokens[piece]))
                yield VISION_END, True, False
        yield IM_END, True, learn
        yield "\n", False, False

    @classmethod
    def _turn_pieces(cls, question: str, answer: str | None, image_tokens: int | None
                     ) -> Iterator[_Piece]:
        """Pieces of one user turn (the image block first) and its assistant turn
        (``answer=None``: the generation prompt, ending with the assistant header)."""
        image = (0,) if image_tokens is not None else ()
        yield from cls._message_pieces(Message("user", (*image, question.strip())), [image_tokens])
        if answer is None:
            yield IM_START, True, False
            yield "assistant\n", False, False
        else:
            yield from cls._message_pieces(Message("assistant", (answer,)), [])

    def _encode_pieces(self, pieces: Iterator[_Piece]) -> tuple[list[int], list[bool]]:
        """Ids and supervision of pieces; adjacent text with the same supervision is encoded
        as one run (as a whole-string encode would see it)."""
        ids, supervised, run, run_supervised = [], [], "", False

        def flush():
            tokens = self._encode_text(run) if run else []
            ids.extend(tokens)
            supervised.extend([run_supervised] * len(tokens))

        for text, special, sup in pieces:
            if special:
                flush()
                run = ""
                ids.append(self.tokenizer.token_id(text))
                supervised.append(sup)
            elif run and sup == run_supervised:
                run += text
            else:
                flush()
                run, run_supervised = text, sup
        flush()
        return ids, supervised

    def _encode_text(self, text: str) -> list[int]:
        """Ids of plain text; ``<think>`` / ``</think>`` by their ids (module docstring)."""
        ids = []
        for i, part in enumerate(_THINK_TAGS.split(text)):
            ids += [self.tokenizer.token_id(part)] if i % 2 else self.tokenizer.encode(part)
        return ids

    # --- text --------------------------------------------------------------------------------

    def render(self, turns: Sequence[Turn], image_tokens: int | None = None) -> str:
        """The training text of ``turns``; the image block (``image_tokens`` placeholders) goes
        into the first user turn."""
        return "".join(text for i, turn in enumerate(turns)
                       for text, _, _ in self._turn_pieces(turn.question, turn.answer,
                                                           image_tokens if i == 0 else None))

    def render_prompt(self, question: str, image_tokens: int | None = None,
                      history: Sequence[Turn] = ()) -> str:
        """Evaluation prompt: ``history`` turns (the image in the first one), then ``question``
        and the assistant header the model continues from."""
        image_last = image_tokens if not history else None
        return (self.render(history, image_tokens)
                + "".join(t for t, _, _ in self._turn_pieces(question, None, image_last)))

    # --- tokens ------------------------------------------------------------------------------

    def encode_prompt(self, question: str, image_tokens: int | None = None,
                      history: Sequence[Turn] = ()) -> list[int]:
        """Token ids of ``render_prompt`` (special tokens by id)."""
        encoded = self.encode(history, image_tokens) if history else None
        ids = encoded.ids.tolist() if encoded is not None else []
        image_last = image_tokens if not history else None
        return ids + self._encode_pieces(self._turn_pieces(question, None, image_last))[0]

    def encode(self, turns: Sequence[Turn], image_tokens: int | None = None,
               max_tokens: int | None = None) -> EncodedConversation:
        """Tokens of ``render(turns, image_tokens)``.

        With ``max_tokens``, turns are kept in order while the sequence (image block included)
        stays within it; a turn that does not fit is left out and the next one is tried. The
        image block goes into the first kept turn. Turn boundaries fall on special tokens, so
        the kept turns' tokens are exactly those of rendering only them.
        """
        ids, supervised, answer_turn, kept = [], [], [], []
        for turn in turns:
            turn_ids, turn_sup = self._encode_pieces(self._turn_pieces(
                turn.question, turn.answer, image_tokens if not kept else None))
            if max_tokens is not None and len(ids) + len(turn_ids) > max_tokens:
                continue
            ids += turn_ids
            supervised += turn_sup
            answer_turn += [len(kept) if s else -1 for s in turn_sup]
            kept.append(turn)
        return EncodedConversation(
            ids=torch.tensor(ids, dtype=torch.int64),
            supervised=torch.tensor(supervised, dtype=torch.bool),
            answer_turn=torch.tensor(answer_turn, dtype=torch.int64), turns=kept,
            num_image_tokens=image_tokens if kept and image_tokens is not None else 0)

    # --- conversations with 0..n images ------------------------------------------------------

    def render_messages(self, messages: Sequence[Message], image_tokens: Sequence[int] = ()
                        ) -> str:
        """The training text of ``messages``; image ``i`` gets ``image_tokens[i]`` pads."""
        _check_image_tokens(messages, image_tokens)
        return "".join(text for message in messages
                       for text, _, _ in self._message_pieces(message, image_tokens))

    def encode_messages(self, messages: Sequence[Message], image_tokens: Sequence[int] = (),
                        kind: str = "conversation") -> EncodedConversation:
        """Tokens of ``render_messages``; every assistant message is learnt and becomes one of
        ``turns`` (tagged ``kind``). Messages start at special tokens, so encoding them one by
        one gives the ids of the whole text."""
        _check_image_tokens(messages, image_tokens)
        ids, supervised, answer_turn, turns, question = [], [], [], [], ""
        for message in messages:
            message_ids, message_sup = self._encode_pieces(
                self._message_pieces(message, image_tokens))
            ids += message_ids
            supervised += message_sup
            answer_turn += [len(turns) if s else -1 for s in message_sup]
            if message.role == "user":
                question = message.text.strip()
            elif message.role == "assistant":
                turns.append(Turn(question, message.text, kind))
        return EncodedConversation(
            ids=torch.tensor(ids, dtype=torch.int64),
            supervised=torch.tensor(supervised, dtype=torch.bool),
            answer_turn=torch.tensor(answer_turn, dtype=torch.int64), turns=turns,
            num_image_tokens=sum(image_tokens))


def _check_image_tokens(messages: Sequence[Message], image_tokens: Sequence[int]) -> None:
    """The messages must show images 0..n-1 once each, in order, n = len(image_tokens)."""
    shown = [i for message in messages for i in message.images]
    if shown != list(range(len(image_tokens))):
        raise ValueError(f"messages show images {shown}, expected 0..{len(image_tokens) - 1} "
                         "once each in order")
