"""Pack image conversations into one fixed-size multimodal micro-batch (THD in both towers).

A pack holds ``k`` samples (a conversation and its 0..n images each) back to back in a fixed LLM token
budget ``T`` (the tail is padding) and at most ``V`` ViT patches. The ViT side is not padded: the
encoder runs whole on the first pipeline stage and its output never crosses a stage boundary, so
its length may vary from pack to pack, and a padding segment would cost attention over itself
(quadratic in its length: up to half a pack's ViT FLOPs). Each sample is its own
attention segment in the LLM (``cu_seqlens``: causal within a sample, never across) and each
image its own segment in the ViT (``PackedImages.cu_seqlens``; a pack of text-only samples has no
ViT side, ``images`` None); the LLM's padding tail is one more
segment (``data.packing.pack_layout``'s convention), so real tokens never attend to it.
Position ids restart at 0 in every segment. The images are in sample order and, within a
sample, in the order its conversation shows them, which is the order of their
``<|image_pad|>`` placeholders in ``input_ids``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from megatron_finevit.data.packing import pack_layout
from megatron_finevit.data.tasks.chat import IGNORE_INDEX, EncodedConversation
from megatron_finevit.models.vit.patch_embed import PackedImages, pack_images

MERGE_WINDOW = 4  # 2×2 ViT patches -> one LLM token


# A trimmed pack's LLM rows are a multiple of this (and of the layout's own multiples): GEMM
# shapes that tensor cores and FP8 like, at <= 63 padding rows a pack.
LLM_TRIM_MULTIPLE = 64

@dataclasses.dataclass
class MultimodalSample:
    """An encoded conversation and its images ``[3, H_i, W_i]`` (sides multiples of 28), in the
    order the conversation shows them (none for a text-only sample)."""

    key: str
    images: Sequence[torch.Tensor]
    conversation: EncodedConversation


@dataclasses.dataclass
class MultimodalBatch:
    """One packed micro-batch (``T`` = LLM budget, ``V`` = ViT budget, ``k`` samples).

    input_ids: int64 ``[T]``; the padding tail holds ``<|endoftext|>``.
    labels: int64 ``[T]``, already shifted: ``labels[t]`` is the target of ``logits[t]``
        (``input_ids[t + 1]`` when that token is a supervised answer token of the same sample),
        ``IGNORE_INDEX`` (-100) elsewhere: prompts, image tokens, a sample's last position and
        padding. Megatron's vocab-parallel cross-entropy does not skip -100 (it computes a finite
        loss there), so weigh its per-token loss with ``loss_mask`` as pretrain_gpt does.
    loss_mask: float32 ``[T]``, 1 where ``labels != -100``.
    position_ids: int64 ``[T]``, 0, 1, ... restarting at every segment (padding included).
    cu_seqlens: int32 ``[k + 2]`` (``[k + 1]`` when there is no padding) LLM segment bounds —
        ``PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens)``.
    max_seqlen: longest LLM segment (padding included).
    label_task: int64 ``[T]``, index into ``kinds`` of the task ``labels[t]`` belongs to, -1 where
        masked (per-task losses: ``loss[label_task == i]``).
    images: ``PackedImages``: patches ``[N <= V, 3·14·14]`` (the images' own, no padding),
        ``cu_seqlens`` per image, ``grids [n, 2]`` (``n`` images of the ``k`` samples); None
        when no sample of the pack has an image.
    keys: sample keys; task_kinds: per sample, the kinds of its turns in order.
    kinds: the task-kind names ``label_task`` indexes.
    skipped: skip counts at the time the batch was made (reason -> samples).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    label_task: torch.Tensor
    images: PackedImages | None
    keys: list[str]
    task_kinds: list[list[str]]
    kinds: tuple[str, ...]
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    def trimmed(self, multiple: int) -> MultimodalBatch:
        """The batch with its LLM padding tail cut to the least multiple of ``multiple`` that
        holds the samples (``T' <= T``; the tail stays a segment of its own when non-empty).

        Every sample's losses and gradients are unchanged (padding is masked and attends only
        to itself), and the compute on padding rows is saved. For layouts whose sequence length
        may change between micro-batches: not under pipeline parallelism, whose p2p buffers
        have the fixed ``T``. ``multiple`` must be a multiple of the packing's
        ``segment_multiple`` (CP) and of TP under sequence parallelism."""
        bounds = self.cu_seqlens.tolist()
        used = bounds[self.num_samples]
        length = min(-(-used // multiple) * multiple, len(self.input_ids))
        if length == len(self.input_ids):
            return self
        cu_seqlens = self.cu_seqlens[: self.num_samples + 1]
        if length > used:
            cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([length])])
        segments = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        return dataclasses.replace(
            self, input_ids=self.input_ids[:length], labels=self.labels[:length],
            loss_mask=self.loss_mask[:length], position_ids=self.position_ids[:length],
            cu_seqlens=cu_seqlens, max_seqlen=max(segments), label_task=self.label_task[:length])


def image_llm_tokens(image: torch.Tensor, patch_size: int = 14) -> int:
    """``<|image_pad|>`` tokens of a resized image ``[3, H, W]``: its 2×2 merge windows."""
    return (image.shape[1] // patch_size) * (image.shape[2] // patch_size) // MERGE_WINDOW


def pack_multimodal(samples: Sequence[MultimodalSample], llm_tokens: int, vit_tokens: int,
                    pad_id: int, kinds: Sequence[str],
                    segment_multiple: int = 1) -> MultimodalBatch:
    """Lay ``samples`` out in one ``MultimodalBatch`` (see its docstring for shapes).

    ``segment_multiple``: every sample's LLM segment is padded to a multiple of it (``pad_id``,
    no label, positions running on) — ``2·cp`` under context parallelism, which cuts every
    segment in ``2·cp`` chunks (``models.attention.context_parallel``); ``llm_tokens`` must be a
    multiple of it, so the padding tail is too. Padding at a sample's end changes none of its
    losses: attention within it is causal.

    Raises ValueError if the samples (padded) overflow either budget or a conversation's
    placeholders do not match its images' merge windows.
    """
    if not samples:
        raise ValueError("a pack needs at least one sample")
    if segment_multiple < 1 or llm_tokens % segment_multiple:
        raise ValueError(f"llm_tokens={llm_tokens} must be a multiple of "
                         f"segment_multiple={segment_multiple}")
    kinds = tuple(kinds)
    for sample in samples:
        windows = sum(image_llm_tokens(image) for image in sample.images)
        if sample.conversation.num_image_tokens != windows:
            raise ValueError(f"sample {sample.key}: {sample.conversation.num_image_tokens} "
                             f"image placeholders for images of {windows} merge windows")
    layout = pack_layout([-(-len(s.conversation) // segment_multiple) * segment_multiple
                          for s in samples], llm_tokens)
    all_images = [image for s in samples for image in s.images]
    images = pack_images(all_images) if all_images else None
    if images is not None and len(images.patches) > vit_tokens:
        raise ValueError(f"{len(images.patches)} patches do not fit the ViT budget {vit_tokens}")

    input_ids = torch.full((llm_tokens,), pad_id, dtype=torch.int64)
    labels = torch.full((llm_tokens,), IGNORE_INDEX, dtype=torch.int64)
    label_task = torch.full((llm_tokens,), -1, dtype=torch.int64)
    position_ids = torch.empty(llm_tokens, dtype=torch.int64)
    bounds = layout.cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        position_ids[start:end] = torch.arange(end - start)
    for sample, start in zip(samples, bounds):
        conversation = sample.conversation
        end = start + len(conversation)
        input_ids[start:end] = conversation.ids
        labels[start:end] = conversation.labels()
        turn_kind = torch.tensor([kinds.index(t.kind) for t in conversation.turns] + [-1])
        label_task[start:end] = turn_kind[conversation.label_turns()]  # -1 indexes the -1 tail
    return MultimodalBatch(
        input_ids=input_ids, labels=labels, loss_mask=(labels != IGNORE_INDEX).float(),
        position_ids=position_ids, cu_seqlens=layout.cu_seqlens, max_seqlen=layout.max_seqlen,
        label_task=label_task, images=images, keys=[s.key for s in samples],
        task_kinds=[[t.kind for t in s.conversation.turns] for s in samples], kinds=kinds)
