"""Greedy decoding through megatron at any tensor / sequence / pipeline layout, without a KV cache.

Requests (an image and a prompt holding its placeholders) are packed like training micro-batches:
one fixed-size ``[1, T]`` THD row per pack, one segment of ``len(prompt) + max_new_tokens``
tokens per request and a padding tail (``data.packing.pack_layout``), positions restarting per
segment. Attention is causal within a segment, so the logits at a request's last written slot
depend on its own tokens so far only: the slots not generated yet (pad ids) lie after it.

Each round runs every unfinished pack once through megatron's forward-only schedule (one
micro-batch per pack; under PP the p2p shape ``[T (/ TP under SP), 1, h]`` is fixed because
``T`` is) and appends each running request's argmax at its next slot. A request stops at a stop
id (not returned) or after ``max_new_tokens``. The cost is a full forward of the pack's LLM
tokens per generated token — fine for the short answers of evaluation, and nothing to keep in
step across stages but the chosen ids. The images do not change between rounds: the first stage
encodes and projects a pack's images in its first round and passes those features to the model
in the later ones (``FineViTVLModel.forward(image_features=)``).

Only the requests' current positions go through the output layer (``output_mask``): their
vocab-parallel logits ``[1, k, V_pad / TP]`` are gathered over TP, padded vocabulary ids (``>= vocab_size``) dropped, the
image placeholder id suppressed (a generated placeholder would be read as an image slot, which
the pack has no features for), the argmax taken (ties: the lowest id, as transformers'
``argmax`` over the whole vocabulary) and broadcast from the last pipeline stage to the others,
so every rank of a model-parallel group returns the same ids. Data-parallel ranks generate their own requests
independently (no collective across them).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from megatron_finevit.data.packing import pack_layout
from megatron_finevit.models.llm.packing import segment_positions, thd_packed_seq_params
from megatron_finevit.models.vit import PackedImages, pack_images

PATCH_SIZE = 14


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One image ``[3, H, W]`` (sides multiples of 28, normalised as in training) and its prompt
    token ids (one image placeholder per 2×2 merge window, e.g.
    ``Qwen3ChatTemplate.encode_prompt``)."""

    image: torch.Tensor
    prompt: Sequence[int]

    @property
    def num_patches(self) -> int:
        return (self.image.shape[1] // PATCH_SIZE) * (self.image.shape[2] // PATCH_SIZE)

    def segment_length(self, max_new_tokens: int) -> int:
        """LLM tokens the request takes in a pack: its prompt and every answer slot."""
        return len(self.prompt) + max_new_tokens

    def fits(self, max_new_tokens: int, seq_length: int, vit_tokens: int | None) -> bool:
        """Whether the request fits an empty pack of ``seq_length`` LLM tokens and
        ``vit_tokens`` ViT patches (None: no patch budget)."""
        return (self.segment_length(max_new_tokens) <= seq_length
                and (vit_tokens is None or self.num_patches <= vit_tokens))


def plan_packs(requests: Sequence[GenerationRequest], max_new_tokens: int, seq_length: int,
               vit_tokens: int | None = None) -> list[list[int]]:
    """Request indices per pack: in order, a new pack whenever the next request would overflow
    the LLM or the ViT budget. Raises ValueError for a request that fits no pack."""
    packs: list[list[int]] = []
    tokens = patches = 0
    for index, request in enumerate(requests):
        if not request.fits(max_new_tokens, seq_length, vit_tokens):
            raise ValueError(
                f"request {index} ({len(request.prompt)} prompt + {max_new_tokens} new tokens, "
                f"{request.num_patches} patches) does not fit a pack of {seq_length} tokens"
                + (f" and {vit_tokens} patches" if vit_tokens is not None else ""))
        length = request.segment_length(max_new_tokens)
        if not packs or tokens + length > seq_length or (
                vit_tokens is not None and patches + request.num_patches > vit_tokens):
            packs.append([])
            tokens = patches = 0
        packs[-1].append(index)
        tokens += length
        patches += request.num_patches
    return packs


class _Pack:
    """The requests of one pack and their decoding state.

    ids / positions: int64 ``[T]``; images: the pack's ``PackedImages``; features: their
    projected features ``[N / 4, H]`` once the first pipeline stage has computed them (None
    before, and on other stages); slot: int64 ``[k]``, where each request's next token goes (its
    current last token is at ``slot - 1``); generated: the ids chosen so far per request;
    running: bool ``[k]``.
    """

    def __init__(self, requests: Sequence[GenerationRequest], max_new_tokens: int,
                 seq_length: int, pad_id: int):
        layout = pack_layout([r.segment_length(max_new_tokens) for r in requests], seq_length)
        self.cu_seqlens = layout.cu_seqlens
        self.ids = torch.full((seq_length,), pad_id, dtype=torch.int64)
        starts = self.cu_seqlens[: len(requests)].long()
        for request, start in zip(requests, starts.tolist()):
            self.ids[start:start + len(request.prompt)] = torch.as_tensor(request.prompt)
        self.positions = segment_positions(self.cu_seqlens)
        self.images: PackedImages = pack_images([r.image for r in requests])  # no ViT padding
        self.features: torch.Tensor | None = None
        self.slot = starts + torch.tensor([len(r.prompt) for r in requests])
        self.generated: list[list[int]] = [[] for _ in requests]
        self.running = torch.ones(len(requests), dtype=torch.bool)

    def step(self, tokens: torch.Tensor, stop_ids: set[int], max_new_tokens: int) -> None:
        """Apply one round's chosen ids ``[k]`` to the running requests."""
        for i in torch.nonzero(self.running).flatten().tolist():
            token = int(tokens[i])
            if token in stop_ids:
                self.running[i] = False
                continue
            self.generated[i].append(token)
            self.ids[self.slot[i]] = token
            self.slot[i] += 1
            if len(self.generated[i]) == max_new_tokens:
                self.running[i] = False


@torch.no_grad()
def greedy_generate(model_chunks: list, requests: Sequence[GenerationRequest], *,
                    max_new_tokens: int, seq_length: int, vocab_size: int, pad_id: int,
                    image_token_id: int, stop_ids: Sequence[int] = (),
                    vit_tokens: int | None = None) -> list[list[int]]:
    """Greedy continuations of ``requests`` (module docstring), this rank's FineViT-VL.

    Args:
        model_chunks: one ``FineViTVLModel`` chunk in a list, possibly wrapped (DDP,
            Float16Module); set to eval mode for the call and restored after.
        max_new_tokens: answer tokens per request at most.
        seq_length: ``T``, LLM tokens per pack (a multiple of TP under sequence parallelism).
        vocab_size: real vocabulary size; ids at or beyond it (megatron's padding) never win.
        pad_id: fills the unused slots and the padding tail.
        image_token_id: the image placeholder, never generated (transformers:
            ``suppress_tokens=[image_token_id]``).
        stop_ids: ids that end a request (not returned), e.g. ``<|im_end|>``, ``<|endoftext|>``.
        vit_tokens: ViT patches per pack at most (not padded, as in training); None: no bound.

    Returns the generated ids per request, in request order, on every rank of the
    model-parallel group. Every rank of that group must pass the same requests.
    """
    from megatron.core.utils import get_model_config

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    config = get_model_config(model_chunks[0])
    if config.sequence_parallel and seq_length % config.tensor_model_parallel_size:
        raise ValueError(f"seq_length={seq_length} must be a multiple of tensor_parallel="
                         f"{config.tensor_model_parallel_size} under sequence parallelism")
    plan = plan_packs(requests, max_new_tokens, seq_length, vit_tokens)
    packs = [_Pack([requests[i] for i in indices], max_new_tokens, seq_length, pad_id)
             for indices in plan]
    training = [chunk.training for chunk in model_chunks]
    for chunk in model_chunks:
        chunk.eval()
    try:
        stops = {int(s) for s in stop_ids}
        for _ in range(max_new_tokens):
            active = [pack for pack in packs if pack.running.any()]
            if not active:
                break
            tokens = _next_tokens(model_chunks, active, seq_length, vocab_size, image_token_id)
            for pack, chosen in zip(active, tokens.split([len(p.running) for p in active])):
                pack.step(chosen, stops, max_new_tokens)
    finally:
        for chunk, mode in zip(model_chunks, training):
            chunk.train(mode)
    generated = [None] * len(requests)
    for indices, pack in zip(plan, packs):
        for index, ids in zip(indices, pack.generated):
            generated[index] = ids
    return generated


def _next_tokens(model_chunks: list, packs: list[_Pack], seq_length: int, vocab_size: int,
                 image_token_id: int) -> torch.Tensor:
    """One forward-only pass over ``packs`` (one micro-batch each): int64 ``[Σ k]``, the argmax
    at every request's last written slot, on every pipeline stage (all requests, running or not:
    the caller applies the running ones)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron.core.utils import get_attr_wrapped_model

    from megatron_finevit.platform.distributed import collective_device

    device = next(model_chunks[0].parameters()).device
    chosen = []

    def forward_step(data_iterator, model):
        pack = next(data_iterator)
        if pack.features is None and get_attr_wrapped_model(model, "pre_process"):
            images = dataclasses.replace(pack.images, patches=pack.images.patches.to(device))
            pack.features = get_attr_wrapped_model(model, "image_features")(images)
        current = torch.zeros(1, seq_length, dtype=torch.bool)
        current[0, pack.slot - 1] = True  # each request's last written slot, in request order
        output = model(None, pack.ids[None].to(device), pack.positions[None].to(device),
                       packed_seq_params=thd_packed_seq_params(pack.cu_seqlens.to(device)),
                       output_mask=current.to(device), image_features=pack.features)

        def pick(logits):  # last stage: [1, k, V_pad / TP], the current slots only
            rows = logits[0]  # [k, V_pad / TP]
            full = gather_from_tensor_model_parallel_region(rows)[:, :vocab_size]  # [k, V]
            full[:, image_token_id] = float("-inf")
            chosen.append(full.argmax(dim=-1))
            return torch.zeros((), device=logits.device), {}

        return output, pick

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(packs), model=model_chunks,
        num_microbatches=len(packs), seq_length=seq_length, micro_batch_size=1,
        forward_only=True)
    total = sum(len(pack.running) for pack in packs)
    tokens = (torch.cat(chosen) if chosen
              else torch.empty(total, dtype=torch.int64)).to(collective_device())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(tokens, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
    return tokens.cpu()
