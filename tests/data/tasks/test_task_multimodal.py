"""Multimodal packing against the per-sample (unpacked) oracle: segments, restarting positions,
labels that never cross a sample, placeholders in image order, the padding segment."""

from itertools import takewhile

import pytest
import torch

from megatron_finevit.data.tasks.chat import IGNORE_INDEX, Qwen3ChatTemplate, Turn
from megatron_finevit.data.tasks.multimodal import (MultimodalSample, image_llm_tokens,
                                                    pack_multimodal)
from megatron_finevit.data.tasks.region_qa import TASK_KINDS
from megatron_finevit.data.tokenizers import QwenTokenizer
from megatron_finevit.models.vit.patch_embed import image_to_patches

SIZES = [(56, 84), (28, 56), (84, 56)]  # (H, W): 6, 2 and 6 merge windows
TURNS = [[Turn("Describe this image in detail.", "A red circle.", "global_caption"),
          Turn("Read [1, 2, 3, 4].", "EXIT", "bbox_to_ocr")],
         [Turn("Where is OPEN?", "[5, 6, 7, 8]", "ocr_to_bbox")],
         [Turn("Describe the region [0, 0, 9, 9].", "a cat", "bbox_to_caption"),
          Turn("Locate a dog.", "[1, 1, 2, 2]", "caption_to_bbox"),
          Turn("Describe this image.", "Animals.", "global_caption")]]


@pytest.fixture(scope="module")
def template():
    return Qwen3ChatTemplate(QwenTokenizer.from_tiktoken())


@pytest.fixture(scope="module")
def samples(template):
    generator = torch.Generator().manual_seed(0)
    out = []
    for i, ((h, w), turns) in enumerate(zip(SIZES, TURNS)):
        image = torch.randn(3, h, w, generator=generator)
        out.append(MultimodalSample(f"s{i}", [image],
                                    template.encode(turns, image_llm_tokens(image))))
    return out


def test_pack_equals_the_unpacked_samples(template, samples):
    lengths = [len(s.conversation) for s in samples]
    budget, vit_budget = sum(lengths) + 37, 200
    batch = pack_multimodal(samples, budget, vit_budget, template.pad_id, TASK_KINDS)

    bounds = [0]
    for n in lengths + [37]:
        bounds.append(bounds[-1] + n)
    assert batch.cu_seqlens.tolist() == bounds and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == max(lengths + [37])
    for shape in (batch.input_ids, batch.labels, batch.loss_mask, batch.position_ids,
                  batch.label_task):
        assert shape.shape == (budget,)
    for i, sample in enumerate(samples):
        seg = slice(bounds[i], bounds[i + 1])
        conversation = sample.conversation
        assert torch.equal(batch.input_ids[seg], conversation.ids)
        assert torch.equal(batch.labels[seg], conversation.labels())
        assert torch.equal(batch.position_ids[seg], torch.arange(lengths[i]))
        kinds = [TASK_KINDS.index(t.kind) for t in TURNS[i]]
        want_task = [kinds[j] if j >= 0 else -1 for j in conversation.label_turns().tolist()]
        assert batch.label_task[seg].tolist() == want_task
        assert int((batch.input_ids[seg] == template.image_token_id).sum()) == (
            SIZES[i][0] * SIZES[i][1] // (28 * 28))
    # The padding tail: its own segment, pad ids, nothing learnt, positions from 0.
    pad = slice(bounds[-2], bounds[-1])
    assert (batch.input_ids[pad] == template.pad_id).all()
    assert (batch.labels[pad] == IGNORE_INDEX).all() and (batch.label_task[pad] == -1).all()
    assert torch.equal(batch.position_ids[pad], torch.arange(37))
    assert torch.equal(batch.loss_mask, (batch.labels != IGNORE_INDEX).float())
    assert batch.keys == ["s0", "s1", "s2"]
    assert batch.task_kinds == [[t.kind for t in turns] for turns in TURNS]


def test_labels_never_cross_a_sample(template, samples):
    """Brute force over every position: a target is the next token of the same sample."""
    batch = pack_multimodal(samples, 400, 200, template.pad_id, TASK_KINDS)
    segment = torch.bucketize(torch.arange(400), batch.cu_seqlens[1:].long(), right=True)
    for t in range(400):
        label = int(batch.labels[t])
        if label != IGNORE_INDEX:
            assert t + 1 < 400 and segment[t + 1] == segment[t]
            assert label == int(batch.input_ids[t + 1])
            assert int(batch.input_ids[t + 1]) != template.image_token_id
    assert int(batch.loss_mask.sum()) == sum(int(s.conversation.supervised.sum())
                                            for s in samples)


def test_images_follow_their_placeholders(template, samples):
    batch = pack_multimodal(samples, 400, 200, template.pad_id, TASK_KINDS)
    packed = batch.images
    assert packed.patches.shape == (56, 3 * 14 * 14)  # the images' own patches: no ViT padding
    assert packed.grids.tolist() == [[h // 14, w // 14] for h, w in SIZES]
    bounds = packed.cu_seqlens.tolist()
    assert bounds == [0, 24, 32, 56]
    for i, sample in enumerate(samples):
        assert torch.equal(packed.patches[bounds[i]:bounds[i + 1]],
                           image_to_patches(sample.images[0])[0])
    with pytest.raises(ValueError, match="56 patches do not fit the ViT budget 55"):
        pack_multimodal(samples, 400, 55, template.pad_id, TASK_KINDS)
    # Placeholders in input_ids, in order, belong to samples 0, 0, ..., 1, 1, 2, ...
    segment = torch.bucketize(torch.arange(400), batch.cu_seqlens[1:].long(), right=True)
    owners = segment[batch.input_ids == template.image_token_id].tolist()
    assert owners == [0] * 6 + [1] * 2 + [2] * 6


def test_a_full_pack_has_no_padding_segment_and_overflow_is_refused(template, samples):
    exact = sum(len(s.conversation) for s in samples)
    batch = pack_multimodal(samples, exact, 56, template.pad_id, TASK_KINDS)
    assert len(batch.cu_seqlens) == len(samples) + 1 and batch.images.cu_seqlens[-1] == 56
    with pytest.raises(ValueError, match="do not fit"):
        pack_multimodal(samples, exact - 1, 200, template.pad_id, TASK_KINDS)
    with pytest.raises(ValueError, match="do not fit"):
        pack_multimodal(samples, exact, 55, template.pad_id, TASK_KINDS)
    wrong = MultimodalSample("bad", samples[0].images, samples[1].conversation)
    with pytest.raises(ValueError, match="2 image placeholders for images of 6"):
        pack_multimodal([wrong], 400, 200, template.pad_id, TASK_KINDS)


def test_multi_image_and_text_only_samples(template):
    """A two-image conversation keeps its images in the order it shows them (the ViT segments and
    the placeholder runs agree image by image); a text-only sample adds LLM tokens only; a pack
    of text-only samples has no ViT side."""
    from megatron_finevit.data.tasks.chat import Message

    generator = torch.Generator().manual_seed(1)
    first, second = torch.randn(3, 28, 56, generator=generator), torch.randn(3, 56, 56,
                                                                             generator=generator)
    messages = [Message("user", ("Compare ", 0, " with ", 1, ".")), Message("assistant", ("Same.",))]
    two = MultimodalSample("two", [first, second], template.encode_messages(
        messages, [image_llm_tokens(first), image_llm_tokens(second)]))
    text = MultimodalSample("text", [], template.encode_messages(
        [Message("user", ("2 + 2?",)), Message("assistant", ("4",))]))
    batch = pack_multimodal([text, two], 200, 100, template.pad_id, ("conversation",))
    assert batch.images.cu_seqlens.tolist() == [0, 8, 24]
    assert torch.equal(batch.images.patches[:8], image_to_patches(first)[0])
    assert torch.equal(batch.images.patches[8:], image_to_patches(second)[0])
    # the first run of placeholders (2 windows) is the first image's, then the second's (4)
    ids = batch.input_ids.tolist()
    vision_start = template.tokenizer.token_id("<|vision_start|>")
    runs = [len(list(takewhile(lambda t: t == template.image_token_id, ids[i + 1:])))
            for i, t in enumerate(ids) if t == vision_start]
    assert runs == [2, 4]
    assert batch.cu_seqlens[1] == len(text.conversation)  # the text-only sample comes first
    only_text = pack_multimodal([text], 64, 100, template.pad_id, ("conversation",))
    assert only_text.images is None and int(only_text.loss_mask.sum()) == 2  # "4", <|im_end|>
