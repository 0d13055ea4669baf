"""SFT conversation rendering: multi-turn and multi-image conversations against hand-written
Qwen3 chat strings, token ids against a whole-string encode, the label mask token by token, the
<think> block, images in order, and the stored form's round trip."""

import pytest

from megatron_finevit.data.bad_samples import BadSampleError
from megatron_finevit.data.resize import ResizePolicy
from megatron_finevit.data.tasks.chat import Message, Qwen3ChatTemplate, Turn
from megatron_finevit.data.tasks.conversation import (encode_conversation, messages_from_meta,
                                                      messages_to_json)
from megatron_finevit.data.tokenizers import QwenTokenizer
from megatron_finevit.testing.chat_checks import check_tokens_and_labels

THINK, END_THINK = 151667, 151668  # Qwen3's <think> / </think>


@pytest.fixture(scope="module")
def template():
    return Qwen3ChatTemplate(QwenTokenizer.from_tiktoken())


def assert_ids_of_whole_string(template, encoded, text):
    assert encoded.ids.tolist() == template.tokenizer.encode(text, allow_special=True)


def test_multi_turn_text_only_with_system_and_think(template):
    messages = [Message("system", ("You are a careful assistant.",)),
                Message("user", ("What is 2+2?",)),
                Message("assistant", ("4",)),
                Message("user", ("  And 3+3?\n",)),  # the ends of a message are stripped
                Message("assistant", ("<think>\n3+3=6\n</think>\n\n6",))]
    expected = ("<|im_start|>system\nYou are a careful assistant.<|im_end|>\n"
                "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                "<|im_start|>assistant\n4<|im_end|>\n"
                "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n3+3=6\n</think>\n\n6<|im_end|>\n")
    assert template.render_messages(messages) == expected
    encoded = template.encode_messages(messages)
    assert_ids_of_whole_string(template, encoded, expected)
    assert encoded.num_image_tokens == 0
    assert encoded.turns == [Turn("What is 2+2?", "4", "conversation"),
                             Turn("And 3+3?", "<think>\n3+3=6\n</think>\n\n6", "conversation")]
    # The think block is one piece of the learnt answer: its tags by id, all supervised.
    learnt = encoded.ids[encoded.supervised].tolist()
    assert template.tokenizer.decode(learnt) == ("4<|im_end|><think>\n3+3=6\n</think>\n\n6"
                                                 "<|im_end|>")
    assert THINK in learnt and END_THINK in learnt


def test_multi_image_conversation(template):
    """Two images, the second in the second user turn: each vision block where its
    placeholder was, with that image's pad count; text around it verbatim."""
    messages = [Message("user", (0, "\nWhat is in this image?")),
                Message("assistant", ("A red square.",)),
                Message("user", ("And here? ", 1, " Compare them.")),
                Message("assistant", ("A blue circle; the first is larger.",))]
    expected = ("<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|image_pad|>"
                "<|vision_end|>\nWhat is in this image?<|im_end|>\n"
                "<|im_start|>assistant\nA red square.<|im_end|>\n"
                "<|im_start|>user\nAnd here? <|vision_start|><|image_pad|><|vision_end|> "
                "Compare them.<|im_end|>\n"
                "<|im_start|>assistant\nA blue circle; the first is larger.<|im_end|>\n")
    assert template.render_messages(messages, image_tokens=[3, 1]) == expected
    encoded = template.encode_messages(messages, image_tokens=[3, 1])
    assert_ids_of_whole_string(template, encoded, expected)
    assert encoded.num_image_tokens == 4
    with pytest.raises(ValueError, match="expected 0..0"):
        template.encode_messages(messages, image_tokens=[3])


def test_label_mask_token_by_token(template):
    """System turn, two images, a think block. Hand-written: every token and whether it is
    learnt (assistant answers and their <|im_end|>; never the newline after it)."""
    messages = [Message("system", ("Be brief.",)), Message("user", (0, "\nColour?")),
                Message("assistant", ("Red.",)), Message("user", ("Sure? ", 1)),
                Message("assistant", ("<think>\nyes\n</think>\n\nYes.",))]
    expected = [  # (token text, supervised)
        ("<|im_start|>", 0), ("system", 0), ("\n", 0), ("Be", 0), (" brief", 0), (".", 0),
        ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("user", 0), ("\n", 0), ("<|vision_start|>", 0),
        ("<|image_pad|>", 0), ("<|image_pad|>", 0), ("<|vision_end|>", 0), ("\n", 0),
        ("Colour", 0), ("?", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant", 0), ("\n", 0),
        ("Red", 1), (".", 1), ("<|im_end|>", 1), ("\n", 0),
        ("<|im_start|>", 0), ("user", 0), ("\n", 0), ("Sure", 0), ("?", 0), (" ", 0),
        ("<|vision_start|>", 0), ("<|image_pad|>", 0), ("<|vision_end|>", 0),
        ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant", 0), ("\n", 0),
        ("<think>", 1), ("\n", 1), ("yes", 1), ("\n", 1), ("</think>", 1), ("\n\n", 1),
        ("Yes", 1), (".", 1), ("<|im_end|>", 1), ("\n", 0),
    ]
    encoded = template.encode_messages(messages, image_tokens=[2, 1])
    check_tokens_and_labels(template.tokenizer, encoded, expected, [0] * 3 + [1] * 9)


def test_stored_form_images_in_order(template):
    """A stored sample: image 0 is 56×112 (8 merge windows), image 1 56×56 (4 windows); the
    vision blocks follow the order of the placeholders, not of the sizes."""
    messages = [Message("user", ("Left: ", 0, " right: ", 1)), Message("assistant", ("Two.",))]
    meta = {"conversation": messages_to_json(messages),
            "images": [{"width": 112, "height": 56}, {"width": 56, "height": 56}]}
    assert meta["conversation"][0]["content"] == [
        {"text": "Left: "}, {"image": 0}, {"text": " right: "}, {"image": 1}]
    assert messages_from_meta(meta) == messages
    encoded = encode_conversation(template, meta, ResizePolicy())
    pads = template.tokenizer.decode(encoded.ids.tolist()).split("<|vision_start|>")[1:]
    assert [block.split("<|vision_end|>")[0].count("<|image_pad|>") for block in pads] == [8, 4]
    swapped = {**meta, "images": meta["images"][::-1]}
    assert encode_conversation(template, swapped, ResizePolicy()).num_image_tokens == 12


@pytest.mark.parametrize("conversation, reason", [
    ([{"role": "user", "content": [{"text": "Hi"}]}], "roles_not_alternating"),
    ([{"role": "user", "content": [{"text": "Hi"}]},
      {"role": "assistant", "content": [{"text": " "}]}], "empty_turn"),
    ([{"role": "user", "content": [{"text": "Hi"}]},
      {"role": "bot", "content": [{"text": "Hello"}]}], "bad_role"),
    ([{"role": "user", "content": [{"image": 1}]},
      {"role": "assistant", "content": [{"text": "A cat."}]}], "image_count_mismatch"),
    ([{"role": "user", "content": [{"txt": "Hi"}]}], "invalid_meta"),
])
def test_stored_form_is_checked_on_read(conversation, reason):
    with pytest.raises(BadSampleError) as err:
        messages_from_meta({"conversation": conversation, "images": [{"width": 9, "height": 9}]
                            if reason == "image_count_mismatch" else []})
    assert err.value.reason == reason
