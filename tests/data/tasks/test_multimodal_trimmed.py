"""``MultimodalBatch.trimmed``: the LLM padding tail cut to the least multiple that holds the
samples. Oracle: the untrimmed batch — the same rows up to the cut, the tail still a segment of
its own, and through a tiny FineViT-VL the same loss and the same gradient of every parameter
(fp32); trimming saves only the padding rows' compute."""

import pytest
import torch

from megatron_finevit.data.tasks.chat import IGNORE_INDEX, Qwen3ChatTemplate, Turn
from megatron_finevit.data.tasks.multimodal import (MultimodalSample, image_llm_tokens,
                                                    pack_multimodal)
from megatron_finevit.data.tasks.region_qa import TASK_KINDS
from megatron_finevit.data.tokenizers import QwenTokenizer

BUDGET = 256
SIZES = [(56, 84), (28, 56), (56, 56)]
TURNS = [[Turn("Describe this image.", "A red circle.", "global_caption")],
         [Turn("Where is OPEN?", "[5, 6, 7, 8]", "ocr_to_bbox")],
         [Turn("What is in [1, 2, 3, 4]?", "A blue square on grass.", "bbox_to_caption")]]


def make_batch(segment_multiple: int = 1):
    template = Qwen3ChatTemplate(QwenTokenizer.from_tiktoken())
    generator = torch.Generator().manual_seed(0)
    samples = []
    for i, ((h, w), turns) in enumerate(zip(SIZES, TURNS)):
        image = torch.randn(3, h, w, generator=generator)
        samples.append(MultimodalSample(f"s{i}", [image],
                                        template.encode(turns, image_llm_tokens(image))))
    batch = pack_multimodal(samples, BUDGET, 512, template.pad_id, TASK_KINDS,
                            segment_multiple=segment_multiple)
    return batch, template


@pytest.mark.parametrize("multiple", [1, 4, 64])
def test_the_tail_is_cut_to_the_multiple(multiple):
    batch, _ = make_batch(segment_multiple=4 if multiple % 4 == 0 else 1)
    used = batch.cu_seqlens.tolist()[batch.num_samples]
    assert used < BUDGET - 64  # a padding tail to cut
    trimmed = batch.trimmed(multiple)
    length = -(-used // multiple) * multiple
    assert len(trimmed.input_ids) == length
    for key in ("input_ids", "labels", "loss_mask", "position_ids", "label_task"):
        assert torch.equal(getattr(trimmed, key), getattr(batch, key)[:length]), key
    bounds = batch.cu_seqlens.tolist()[: batch.num_samples + 1]
    assert trimmed.cu_seqlens.tolist() == bounds + ([length] if length > used else [])
    assert trimmed.max_seqlen == max(b - a for a, b in zip(trimmed.cu_seqlens.tolist(),
                                                           trimmed.cu_seqlens.tolist()[1:]))
    assert trimmed.images is batch.images and trimmed.keys == batch.keys


def test_a_full_pack_is_left_as_it_is():
    batch, _ = make_batch()
    used = batch.cu_seqlens.tolist()[batch.num_samples]
    assert batch.trimmed(BUDGET) is batch
    assert len(batch.trimmed(used).input_ids) == used
    assert batch.trimmed(used).cu_seqlens.tolist() == batch.cu_seqlens.tolist()[:-1]


def trimmed_world(rank: int, world_size: int) -> dict:
    """Loss and gradients of a tiny FineViT-VL on the pack, untrimmed and trimmed to 8."""
    from megatron_finevit.models.llm.packing import thd_packed_seq_params
    from megatron_finevit.testing.finevit_vl_parity import (IMAGE_TOKEN_ID, build_model,
                                                            tiny_vl_config)
    from megatron_finevit.testing.multirank import Layout

    config = tiny_vl_config()
    model = build_model(config, Layout())
    batch, template = make_batch()
    vocab = config.llm.vocab_size

    def remap(ids: torch.Tensor) -> torch.Tensor:  # Qwen ids -> the tiny vocabulary
        small = ids % vocab
        small[small == IMAGE_TOKEN_ID] = IMAGE_TOKEN_ID + 1
        return small.masked_fill(ids == template.image_token_id, IMAGE_TOKEN_ID)

    out = {}
    for name, b in (("full", batch), ("trimmed", batch.trimmed(8))):
        model.zero_grad(set_to_none=True)
        labels = remap(b.labels.masked_fill(b.labels == IGNORE_INDEX, 0))
        token_loss = model(b.images, remap(b.input_ids)[None], b.position_ids[None],
                           labels=labels[None], packed_seq_params=thd_packed_seq_params(
                               b.cu_seqlens), output_mask=b.loss_mask[None]).reshape(-1)
        loss = (token_loss * b.loss_mask).sum() / b.loss_mask.sum()
        loss.backward()
        out[name] = {"loss": loss.item(), "length": len(b.input_ids),
                     "grads": {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}}
    return out


def test_trimmed_pack_gives_the_same_loss_and_gradients():
    from megatron_finevit.testing.multirank import run_world

    (out,) = run_world(trimmed_world, 1)
    full, trimmed = out["full"], out["trimmed"]
    assert trimmed["length"] < full["length"] - 64  # the cut was real
    assert abs(trimmed["loss"] - full["loss"]) <= 1e-6 * abs(full["loss"])
    assert full["grads"].keys() == trimmed["grads"].keys() and len(full["grads"]) > 10
    for name, grad in full["grads"].items():
        scale = grad.abs().max().clamp(min=1e-8)
        assert (trimmed["grads"][name] - grad).abs().max() <= 1e-5 * scale, name
