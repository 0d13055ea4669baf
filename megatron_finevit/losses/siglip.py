"""Stage II sigmoid contrastive loss (SigLIP; paper §3.2, Eq. 2) across data-parallel ranks.

For a global batch of ``B`` image/text pairs with (L2-normalised) embeddings ``x_i``, ``y_j``::

    L = −(1/B) Σ_i Σ_j log σ(s_ij · (t · x_i·y_j + b)),   s_ij = +1 if i == j else −1

with a learnable temperature ``t = exp(logit_scale)`` (init ``t = 10``) and bias ``b`` (init
−10), SigLIP's parameterisation and initialisation. (Eq. 2 as printed puts ``τ`` around
``x·y + b``; with SigLIP's ``b = −10`` init that would start every logit near −100 — we follow
SigLIP, whose bias is added after the scale.) ``−log σ(z) = softplus(−z)`` and
``softplus(z) − softplus(−z) = z``, so a block of logits ``Z`` costs ``Σ softplus(Z)`` when it
holds only negatives and ``Σ softplus(Z) − trace(Z)`` when it is a rank's own (diagonal) block.

**Normalisation.** Eq. 2 divides by the batch size ``n``; we take ``n = B``, the *global* batch,
so the loss does not change with the number of ranks. Rank ``r`` (holding ``b_r`` pairs, ``W``
ranks, ``B = Σ b_r``) returns

    loss_r = (W / B) · Σ_{i on r} Σ_{j global} −log σ(s_ij z_ij)

so that ``mean_r loss_r = L`` — in value and in gradient. That mean is exactly what Megatron's
DDP optimises: it averages parameter gradients over the data-parallel ranks. With equal local
batches ``W / B = 1 / b_local``, open_clip's ``SigLipLoss`` normalisation; the ``W / B`` form
also stays exact when packing gives ranks different numbers of images. Megatron's logging
average over DP of the returned value is then the global loss.

**Distributed computation.** Text embeddings travel around a ring of the ``W`` ranks (``W − 1``
neighbour exchanges): at each step a rank scores its own images against the one text block it
holds, a ``[b_r, b_s]`` logits block. A custom autograd function saves only the local
embeddings, and its backward runs the ring again, recomputing each block, accumulating the
image gradient locally and carrying each text block's gradient along with the block until a
final hop returns it to the rank that owns those texts. Peak logits memory is one
``b_local × b_local`` block in forward and in backward (never ``b × B``, never ``B × B``), at the
cost of recomputing the logits once; communication is ``W − 1`` text blocks forward and ``W − 1``
(text, gradient) pairs plus one gradient block backward. When the text tower is frozen (Stage II
starts that way) the backward ships no text gradients.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

INIT_LOGIT_SCALE = math.log(10.0)
INIT_LOGIT_BIAS = -10.0


class SigLIPLoss(torch.nn.Module):
    """SigLIP's sigmoid loss with learnable ``logit_scale`` (log t) and ``logit_bias`` (b).

    ``forward(image_emb [b_local, d], text_emb [b_local, d], dp_group=None) -> loss_r`` (float32
    scalar; see the module docstring for its normalisation). Row ``i`` of both inputs is a
    positive pair. Embeddings should already be L2-normalised (the towers' heads do it).
    ``dp_group=None`` means no data parallelism: the local batch is the whole batch.
    """

    def __init__(self, init_logit_scale: float = INIT_LOGIT_SCALE,
                 init_logit_bias: float = INIT_LOGIT_BIAS):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = torch.nn.Parameter(torch.tensor(float(init_logit_bias)))

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor,
                dp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
        if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
            raise ValueError(f"image_emb {tuple(image_emb.shape)} and text_emb "
                             f"{tuple(text_emb.shape)} must both be [b_local, d]")
        if image_emb.shape[0] == 0:
            raise ValueError("SigLIPLoss needs at least one image/text pair on every rank")
        sizes = _batch_sizes(image_emb.shape[0], image_emb.device, dp_group)
        return _RingSigmoidLoss.apply(image_emb, text_emb, self.logit_scale, self.logit_bias,
                                      dp_group, sizes)

    def extra_repr(self) -> str:
        return (f"t={self.logit_scale.detach().exp().item():.4g}, "
                f"b={self.logit_bias.detach().item():.4g}")


def loss_and_embedding_grads(loss: SigLIPLoss, image: torch.Tensor, text: torch.Tensor,
                             dp_group: dist.ProcessGroup | None, text_grad: bool = True
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The gradient-cache half of ``loss_scope: step``: ``loss_r`` over this rank's embeddings
    of a whole step (``image``, ``text`` ``[n_local, d]``, computed without autograd) and its
    gradients ``[n_local, d]`` w.r.t. them (text: None unless ``text_grad``), ring-wise and
    chunked like ``forward``. ``logit_scale`` and ``logit_bias`` get their gradient here, once
    (accumulated by autograd, so megatron DDP's hooks add it to their grad buffers); re-running
    the towers with ``(emb · grad).sum()`` as the loss then gives their parameters' gradients.
    Returns ``(loss_r detached, image grad, text grad)``."""
    image = image.detach().requires_grad_()
    text = text.detach().requires_grad_(text_grad)
    with torch.enable_grad():
        value = loss(image, text, dp_group)
        value.backward()
    return value.detach(), image.grad, text.grad


def _batch_sizes(local: int, device: torch.device, group: dist.ProcessGroup | None) -> list[int]:
    """Local batch size of every rank of ``group`` (``[local]`` without a group)."""
    if group is None:
        return [local]
    gathered = [torch.zeros(1, dtype=torch.long, device=device)
                for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, torch.tensor([local], dtype=torch.long, device=device), group=group)
    sizes = [int(s) for s in gathered]
    if min(sizes) == 0:
        raise ValueError(f"SigLIPLoss needs at least one pair on every rank, got sizes {sizes}")
    return sizes


def _block_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, own_block: bool, row_offset: int = 0) -> torch.Tensor:
    """Σ −log σ(s·z) over one logits block ``z = t · image @ text.T + b`` (``[c, b_s]``);
    the pairs are all negatives, except in a rank's ``own_block``, whose positives are
    ``(i, row_offset + i)`` (``image`` holds its rows from ``row_offset`` on)."""
    dtype = torch.promote_types(image.dtype, torch.float32)
    logits = logit_scale.to(dtype).exp() * (image.to(dtype) @ text.to(dtype).T)
    logits = logits + logit_bias.to(dtype)
    loss = F.softplus(logits).sum()
    return loss - logits.diagonal(row_offset).sum() if own_block else loss


def _chunked_block_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                        logit_bias: torch.Tensor, own_block: bool) -> torch.Tensor:
    """``_block_loss`` of ``[b_r, b_s]`` in row chunks of at most ``CHUNK_LOGITS`` logits."""
    loss = None
    for rows in _row_chunks(image.shape[0], text.shape[0]):
        part = _block_loss(image[rows], text, logit_scale, logit_bias, own_block, rows.start)
        loss = part if loss is None else loss + part
    return loss


# Most logits one chunk holds (64 MiB in fp32): bounds the loss's working memory whatever the
# local batch, e.g. ``loss_scope: step`` concatenating every micro-batch of a step. Blocks up to
# 4096 × 4096 are one chunk, i.e. computed exactly as without chunking.
CHUNK_LOGITS = 1 << 24


def _row_chunks(rows: int, cols: int) -> list[slice]:
    """Slices of ``rows`` image rows, each scoring at most ``CHUNK_LOGITS`` logits."""
    step = max(1, CHUNK_LOGITS // max(cols, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


class _Ring:
    """Neighbour exchange on a process group: send to rank + 1, receive from rank − 1."""

    def __init__(self, group: dist.ProcessGroup | None, sizes: list[int]):
        self.group, self.sizes = group, sizes
        self.world = len(sizes)
        self.rank = dist.get_rank(group) if group is not None else 0

    def owner(self, step: int) -> int:
        """Group rank whose text block this rank holds after ``step`` shifts."""
        return (self.rank - step) % self.world

    def shift(self, tensors: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        """Pass ``tensors`` (rows of the block owned by ``owner(step)``) one hop forward; return
        the tensors of the block owned by ``owner(step + 1)``."""
        rows = self.sizes[self.owner(step + 1)]
        received = [t.new_empty((rows, *t.shape[1:])) for t in tensors]
        dst = dist.get_global_rank(self.group, (self.rank + 1) % self.world)
        src = dist.get_global_rank(self.group, (self.rank - 1) % self.world)
        ops = [dist.P2POp(dist.isend, t.contiguous(), dst, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, src, self.group) for t in received]
        # One batch: NCCL would deadlock on a ring of blocking sends; gloo accepts it too.
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return received


class _RingSigmoidLoss(torch.autograd.Function):
    """loss_r = (W / B) · Σ_blocks _block_loss, with the ring backward described above."""

    @staticmethod
    def forward(ctx, image, text, logit_scale, logit_bias, group, sizes):
        ring = _Ring(group, sizes)
        block = text.detach()
        total = image.new_zeros((), dtype=torch.promote_types(image.dtype, torch.float32))
        for step in range(ring.world):
            total = total + _chunked_block_loss(image.detach(), block, logit_scale.detach(),
                                                logit_bias.detach(), own_block=step == 0)
            if step < ring.world - 1:
                (block,) = ring.shift([block], step)
        ctx.ring = ring
        ctx.norm = ring.world / sum(sizes)
        ctx.save_for_backward(image, text, logit_scale, logit_bias)
        return total * ctx.norm

    @staticmethod
    def backward(ctx, grad_output):
        image, text, logit_scale, logit_bias = ctx.saved_tensors
        ring: _Ring = ctx.ring
        need = ctx.needs_input_grad[:4]  # image, text, logit_scale, logit_bias
        weight = grad_output * ctx.norm
        block = text.detach()
        acc_dtype = torch.promote_types(text.dtype, torch.float32)
        block_grad = torch.zeros_like(text, dtype=acc_dtype) if need[1] else None
        totals = [None, None, None]  # image, logit_scale, logit_bias
        for step in range(ring.world):
            g_image, g_block, g_scale, g_bias = _block_grads(
                (image, block, logit_scale, logit_bias), need, weight, own_block=step == 0)
            totals = [g if t is None else t + g for t, g in zip(totals, (g_image, g_scale, g_bias))]
            if need[1]:
                block_grad = block_grad + g_block
            if step < ring.world - 1:
                moved = ring.shift([block] + ([block_grad] if need[1] else []), step)
                block = moved[0]
                block_grad = moved[1] if need[1] else None
        if need[1] and ring.world > 1:
            # The block now held belongs to rank + 1: one more hop returns its gradient home.
            (block_grad,) = ring.shift([block_grad], ring.world - 1)
        g_image, g_scale, g_bias = totals
        return (_grad_as(g_image, image), _grad_as(block_grad, text),
                _grad_as(g_scale, logit_scale), _grad_as(g_bias, logit_bias), None, None)


def _block_grads(inputs: tuple[torch.Tensor, ...], need: tuple[bool, ...], weight: torch.Tensor,
                 own_block: bool) -> list[torch.Tensor | None]:
    """Gradients of ``weight · _chunked_block_loss(*inputs)`` w.r.t. (image, text block,
    logit_scale, logit_bias), ``None`` where ``need`` is False; one row chunk's logits live at a
    time."""
    image, text, scale, bias = inputs
    image_grads, totals = [], [None, None, None]  # text block, logit_scale, logit_bias
    for rows in _row_chunks(image.shape[0], text.shape[0]):
        g_image, *rest = _chunk_grads((image[rows], text, scale, bias), need, weight, own_block,
                                      rows.start)
        image_grads.append(g_image)
        # summed as they come: one text-block-sized gradient, whatever the number of chunks
        totals = [g if t is None else t + g for t, g in zip(totals, rest)]
    if not need[0]:
        return [None, *totals]
    return [image_grads[0] if len(image_grads) == 1 else torch.cat(image_grads), *totals]


def _chunk_grads(inputs: tuple[torch.Tensor, ...], need: tuple[bool, ...], weight: torch.Tensor,
                 own_block: bool, row_offset: int) -> list[torch.Tensor | None]:
    """``_block_grads`` of one row chunk (``_block_loss``'s arguments)."""
    leaves = [t.detach().requires_grad_(n) for t, n in zip(inputs, need)]
    with torch.enable_grad():
        loss = weight * _block_loss(*leaves, own_block=own_block, row_offset=row_offset)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = iter(torch.autograd.grad(loss, wanted))
    return [next(grads) if leaf.requires_grad else None for leaf in leaves]


def _grad_as(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)
