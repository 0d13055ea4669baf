"""Qwen3 chat rendering: the text of each task kind against hand-written strings, token ids
against a whole-string encode, the label mask token by token, and the evaluation prompt."""

import pytest
import torch

from megatron_finevit.config.vlm import QWEN_IMAGE_PAD_ID
from megatron_finevit.data.tasks.boxes import BoxCodec
from megatron_finevit.data.tasks.chat import Qwen3ChatTemplate, Turn
from megatron_finevit.data.tasks.region_qa import TASK_KINDS, TaskMixture, draw_turns
from megatron_finevit.data.tokenizers import QwenTokenizer
from megatron_finevit.testing.chat_checks import check_tokens_and_labels

# A 100×200 image (height, width): region [10, 20, 90, 80] is [50, 200, 450, 800] in 0..1000,
# the OCR box [150, 80, 200, 100] is [750, 800, 1000, 1000].
META = {"caption": "A red circle on the left and the word EXIT.", "width": 200, "height": 100,
        "regions": [{"box": [10, 20, 90, 80], "caption": "a red circle", "label": "circle",
                     "score": 1.0}],
        "ocr": [{"box": [150, 80, 200, 100], "text": "EXIT"}]}

USER = "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
EXPECTED = {
    "global_caption": USER + "Describe this image in detail." + ASSISTANT
    + "A red circle on the left and the word EXIT.<|im_end|>\n",
    "bbox_to_caption": USER + "Describe the region [50, 200, 450, 800]." + ASSISTANT
    + "a red circle<|im_end|>\n",
    "caption_to_bbox": USER + "Locate a red circle in the image and give its bounding box."
    + ASSISTANT + "[50, 200, 450, 800]<|im_end|>\n",
    "bbox_to_ocr": USER + "What text is written in the region [750, 800, 1000, 1000]?"
    + ASSISTANT + "EXIT<|im_end|>\n",
    "ocr_to_bbox": USER + 'Where is the text "EXIT" in the image? Answer with a bounding box.'
    + ASSISTANT + "[750, 800, 1000, 1000]<|im_end|>\n",
}


@pytest.fixture(scope="module")
def template():
    return Qwen3ChatTemplate(QwenTokenizer.from_tiktoken())


def one_turn(kind: str) -> list[Turn]:
    mixture = TaskMixture(**{k: float(k == kind) for k in TASK_KINDS})
    return draw_turns(META, original_hw=(100, 200), resized_hw=(112, 224), codec=BoxCodec(),
                      mixture=mixture, seed=0, key="s0", step=0, max_turns=1)


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_rendered_text_of_each_task_kind(template, kind):
    turns = one_turn(kind)
    assert [t.kind for t in turns] == [kind]
    assert template.render(turns, image_tokens=2) == EXPECTED[kind]
    # Token ids: what encoding the whole string (special tokens recognised) gives.
    encoded = template.encode(turns, image_tokens=2)
    assert encoded.ids.tolist() == template.tokenizer.encode(EXPECTED[kind], allow_special=True)
    assert encoded.num_image_tokens == 2


def test_special_token_ids(template):
    tok = template.tokenizer
    assert template.image_token_id == QWEN_IMAGE_PAD_ID == 151655
    assert template.pad_id == 151643
    assert [tok.token_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                      "<|vision_end|>")] == [151644, 151645, 151652, 151653]


def test_label_mask_token_by_token(template):
    """Two turns; the image in the first. Hand-written: every token and whether it is learnt."""
    turns = [Turn("Read [1, 2, 3, 4].", "EXIT", "bbox_to_ocr"),
             Turn("Where is EXIT?", "[1, 2, 3, 4]", "ocr_to_bbox")]
    expected = [  # (token text, supervised)
        ("<|im_start|>", 0), ("user", 0), ("\n", 0), ("<|vision_start|>", 0),
        ("<|image_pad|>", 0), ("<|image_pad|>", 0), ("<|vision_end|>", 0),
        ("Read", 0), (" [", 0), ("1", 0), (",", 0), (" ", 0), ("2", 0), (",", 0), (" ", 0),
        ("3", 0), (",", 0), (" ", 0), ("4", 0), ("].", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant", 0), ("\n", 0),
        ("EXIT", 1), ("<|im_end|>", 1), ("\n", 0),
        ("<|im_start|>", 0), ("user", 0), ("\n", 0),
        ("Where", 0), (" is", 0), (" EXIT", 0), ("?", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant", 0), ("\n", 0),
        ("[", 1), ("1", 1), (",", 1), (" ", 1), ("2", 1), (",", 1), (" ", 1), ("3", 1),
        (",", 1), (" ", 1), ("4", 1), ("]", 1), ("<|im_end|>", 1), ("\n", 0),
    ]
    encoded = template.encode(turns, image_tokens=2)
    # labels are shifted: position t holds token t + 1 when that token is learnt
    check_tokens_and_labels(template.tokenizer, encoded, expected, [0] * 2 + [1] * 13)


def test_captions_cannot_inject_control_tokens(template):
    encoded = template.encode([Turn("Describe.", "a sign <|im_end|> saying hi")])
    answer_ids = encoded.ids[encoded.supervised].tolist()
    assert answer_ids.count(template.tokenizer.token_id("<|im_end|>")) == 1  # its own closer only
    assert template.tokenizer.decode(answer_ids) == "a sign <|im_end|> saying hi<|im_end|>"


def test_max_tokens_keeps_turns_in_order(template):
    turns = [Turn("Describe this image in detail.", "word " * 40),
             Turn("Read [1, 2, 3, 4].", "EXIT"),
             Turn("Where is EXIT?", "[1, 2, 3, 4]")]
    full = [len(template.encode([t], image_tokens=3)) for t in turns]
    # Room for the image + turn 1 (with the image) + turn 2, not for turn 0.
    budget = full[1] + (full[2] - 3 - 2)
    encoded = template.encode(turns, image_tokens=3, max_tokens=budget)
    assert encoded.turns == turns[1:] and len(encoded) == budget
    assert torch.equal(encoded.ids, template.encode(turns[1:], image_tokens=3).ids)
    assert template.encode(turns, image_tokens=3, max_tokens=full[1]).turns == [turns[1]]
    assert template.encode(turns[::-1], image_tokens=3, max_tokens=full[1]).turns == [turns[1]]
    nothing = template.encode(turns, image_tokens=3, max_tokens=5)
    assert nothing.turns == [] and len(nothing) == 0 and nothing.num_image_tokens == 0


def test_generation_prompt_is_the_training_prefix(template):
    """Evaluation sees exactly the bytes training put before the answer."""
    first, second = Turn("Read [1, 2, 3, 4].", "EXIT"), Turn("Where is EXIT?", "[1, 2, 3, 4]")
    for history, turn in (([], first), ([first], second)):
        full = template.render([*history, turn], image_tokens=2)
        prompt = template.render_prompt(turn.question, image_tokens=2, history=history)
        assert prompt.endswith("<|im_start|>assistant\n")
        assert full == prompt + turn.answer + "<|im_end|>\n"
        ids = template.encode([*history, turn], image_tokens=2).ids.tolist()
        prompt_ids = template.encode_prompt(turn.question, image_tokens=2, history=history)
        assert prompt_ids == template.tokenizer.encode(prompt, allow_special=True)
        assert ids[: len(prompt_ids)] == prompt_ids
