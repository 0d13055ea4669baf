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
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import torch

from megatron_finevit.data.tokenizers import QwenTokenizer

IGNORE_INDEX = -100
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
PAD_TOKEN = "<|endoftext|>"  # fills the padding tail of a pack (always masked)


@dataclasses.dataclass(frozen=True)
class Turn:
    """One question and its answer; ``kind`` tags the task (for per-task loss logs)."""

    question: str
    answer: str
    kind: str = ""


@dataclasses.dataclass
class EncodedConversation:
    """One image's conversation as tokens.

    ids: int64 ``[L]``. supervised: bool ``[L]``, True on the tokens the model must produce
    (answers and their closing ``<|im_end|>``). answer_turn: int64 ``[L]``, index into ``turns``
    of the answer a supervised token belongs to, -1 elsewhere. turns: the turns that were kept
    (``max_tokens`` may leave some out). num_image_tokens: ``<|image_pad|>`` tokens in ``ids``.
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
    def _turn_pieces(question: str, answer: str | None, image_tokens: int | None
                     ) -> Iterator[_Piece]:
        """Pieces of one user turn and its assistant turn (``answer=None``: the generation
        prompt, ending with the assistant header)."""
        yield IM_START, True, False
        yield "user\n", False, False
        if image_tokens is not None:
            yield VISION_START, True, False
            yield from ((IMAGE_PAD, True, False) for _ in range(image_tokens))
            yield VISION_END, True, False
        yield question.strip(), False, False
        yield IM_END, True, False
        yield "\n", False, False
        yield IM_START, True, False
        yield "assistant\n", False, False
        if answer is not None:
            yield answer.strip(), False, True
            yield IM_END, True, True
            yield "\n", False, False

    def _encode_pieces(self, pieces: Iterator[_Piece]) -> tuple[list[int], list[bool]]:
        """Ids and supervision of pieces; adjacent text with the same supervision is encoded
        as one run (as a whole-string encode would see it)."""
        ids, supervised, run, run_supervised = [], [], "", False

        def flush():
            tokens = self.tokenizer.encode(run) if run else []
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
