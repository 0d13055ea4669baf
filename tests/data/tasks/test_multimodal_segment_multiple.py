"""``pack_multimodal(segment_multiple=)``: every sample padded to a multiple of 2·cp LLM tokens
for context parallelism — the same ids, labels and tasks as the unpadded pack at each sample's
tokens, padding with no label and positions running on, the tail a multiple too; and the loader's
allowances rounded up so that padded samples still fit the budget."""

import numpy as np
import pytest
import torch

from megatron_finevit.data.tasks.chat import IGNORE_INDEX, Qwen3ChatTemplate, Turn
from megatron_finevit.data.tasks.multimodal import (MultimodalSample, image_llm_tokens,
                                                    pack_multimodal)
from megatron_finevit.data.tasks.region_qa import TASK_KINDS
from megatron_finevit.data.tokenizers import QwenTokenizer

MULTIPLE = 4  # 2·cp at cp = 2
SIZES = [(56, 84), (28, 56)]
TURNS = [[Turn("Describe this image.", "A red circle.", "global_caption")],
         [Turn("Where is OPEN?", "[5, 6, 7, 8]", "ocr_to_bbox")]]


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


def test_samples_are_padded_to_the_multiple(template, samples):
    lengths = [len(s.conversation) for s in samples]
    assert any(n % MULTIPLE for n in lengths)  # something to pad
    padded = [-(-n // MULTIPLE) * MULTIPLE for n in lengths]
    budget = sum(padded) + 2 * MULTIPLE
    plain = pack_multimodal(samples, budget, 200, template.pad_id, TASK_KINDS)
    batch = pack_multimodal(samples, budget, 200, template.pad_id, TASK_KINDS,
                            segment_multiple=MULTIPLE)
    bounds = batch.cu_seqlens.tolist()
    assert [b - a for a, b in zip(bounds, bounds[1:])] == padded + [2 * MULTIPLE]
    for start, n, n_padded, plain_start in zip(bounds, lengths, padded, plain.cu_seqlens.tolist()):
        real, pad = slice(start, start + n), slice(start + n, start + n_padded)
        same = slice(plain_start, plain_start + n)
        for key in ("input_ids", "labels", "label_task", "position_ids"):
            assert torch.equal(getattr(batch, key)[real], getattr(plain, key)[same]), key
        assert (batch.input_ids[pad] == template.pad_id).all()
        assert (batch.labels[pad] == IGNORE_INDEX).all() and (batch.loss_mask[pad] == 0).all()
        assert torch.equal(batch.position_ids[start:start + n_padded], torch.arange(n_padded))
    assert batch.loss_mask.sum() == plain.loss_mask.sum()
    assert torch.equal(batch.images.patches, plain.images.patches)


def test_padding_must_fit(template, samples):
    lengths = [len(s.conversation) for s in samples]
    tight = -(-sum(lengths) // MULTIPLE) * MULTIPLE  # fits unpadded, not padded
    pack_multimodal(samples, tight, 200, template.pad_id, TASK_KINDS)
    with pytest.raises(ValueError, match="do not fit a budget"):
        pack_multimodal(samples, tight, 200, template.pad_id, TASK_KINDS,
                        segment_multiple=MULTIPLE)
    with pytest.raises(ValueError, match="must be a multiple of segment_multiple=4"):
        pack_multimodal(samples, tight + 2, 200, template.pad_id, TASK_KINDS,
                        segment_multiple=MULTIPLE)


def test_loader_allowances_round_up():
    from types import SimpleNamespace

    from megatron_finevit.data.tasks.region_qa_loader import RegionQAConfig, llm_allowances

    index = SimpleNamespace(**{name: np.array(values) for name, values in dict(
        caption_tokens=[5, 0, 9], num_regions=[1, 2, 0], num_ocr=[0, 1, 1],
        region_tokens=[3, 4, 0], ocr_tokens=[0, 2, 3]).items()})
    patches = np.array([24, 8, 16])
    plain = llm_allowances(index, patches, RegionQAConfig(llm_tokens=256), 7, 5)
    rounded = llm_allowances(index, patches, RegionQAConfig(llm_tokens=256,
                                                            segment_multiple=MULTIPLE), 7, 5)
    assert (rounded % MULTIPLE == 0).all() and (rounded >= plain).all()
    assert (rounded - plain < MULTIPLE).all() and (rounded != plain).any()
    with pytest.raises(ValueError, match="llm_tokens=258 must be a multiple"):
        RegionQAConfig(llm_tokens=258, segment_multiple=MULTIPLE)
