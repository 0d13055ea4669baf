"""The chat renderer's token-by-token check, shared by its tests (Stage III turns, SFT
conversations)."""

from __future__ import annotations

from megatron_finevit.data.tasks.chat import IGNORE_INDEX


def check_tokens_and_labels(tokenizer, encoded, expected: list[tuple[str, int]],
                            label_turns: list[int]) -> None:
    """``encoded`` (an ``EncodedConversation``) decodes token by token to ``expected``
    ``[(text, supervised)]``; its labels are the next token where that token is learnt (shifted by
    one, IGNORE_INDEX elsewhere and at the end); the learnt labels belong to ``label_turns``."""
    decoded = [tokenizer.decode([i]) for i in encoded.ids.tolist()]
    assert list(zip(decoded, encoded.supervised.int().tolist())) == expected
    ids, labels = encoded.ids.tolist(), encoded.labels().tolist()
    want = [ids[t + 1] if expected[t + 1][1] else IGNORE_INDEX for t in range(len(ids) - 1)]
    assert labels == want + [IGNORE_INDEX]
    turn_of_label = encoded.label_turns().tolist()
    assert [turn_of_label[t] for t in range(len(ids)) if labels[t] != IGNORE_INDEX] == label_turns
