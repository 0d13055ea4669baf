"""Attention over independent blocks of a packed tensor: per-block SDPA (CPU, and any device) or
torch's ``varlen_attn`` (CUDA flash kernels).

A block is a run of consecutive query rows attending to a run of key rows; blocks never see each
other, so memory is the sum of the per-block score matrices — linear in the number of segments,
never ``[T, T]``. Causal blocks are aligned bottom-right (flash-attention's convention): the last
query of a block sees all of its keys, query ``i`` of ``q`` queries sees keys ``0 .. k − q + i``.

The CUDA branch (``varlen_attn``, fp16/bf16, no dropout) is not exercised in CI (no GPU there); its
CPU twin, the per-block SDPA loop, is what the tests check, and it also runs on GPU (fp32, dropout).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionBlocks:
    """Independent attention problems over a packed ``q [t_q, np, hn]`` and ``k/v [t_k, ng, hn]``.

    ``q_lengths`` cut ``q`` into consecutive runs (they sum to ``t_q``); block ``j`` attends to
    ``k[k_starts[j] : k_starts[j] + k_lengths[j]]`` (a block with no keys outputs zeros).
    """

    q_lengths: tuple[int, ...]
    k_starts: tuple[int, ...]
    k_lengths: tuple[int, ...]
    causal: bool

    def __post_init__(self):
        if not len(self.q_lengths) == len(self.k_starts) == len(self.k_lengths):
            raise ValueError("q_lengths, k_starts and k_lengths must have one entry per block")
        if self.causal and any(q > k for q, k in zip(self.q_lengths, self.k_lengths)):
            raise ValueError("a causal block needs at least as many keys as queries")


def attend_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: AttentionBlocks,
                  scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax attention of every block: ``q [t_q, np, hn]``, ``k/v [t_k, ng, hn]`` (``ng``
    divides ``np``: grouped-query attention, not expanded) -> ``[t_q, np, hn]``."""
    if q.shape[0] != sum(blocks.q_lengths):
        raise ValueError(f"blocks cover {sum(blocks.q_lengths)} query rows, q has {q.shape[0]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{k.shape[1]} key/value heads do not divide {q.shape[1]} query heads")
    if _use_varlen(q, dropout_p):
        return _varlen_blocks(q, k, v, blocks, scale)
    return _sdpa_blocks(q, k, v, blocks, scale, dropout_p)


def _sdpa_blocks(q, k, v, blocks: AttentionBlocks, scale: float, dropout_p: float) -> torch.Tensor:
    """One ``scaled_dot_product_attention`` call per block (the CPU path)."""
    gqa = q.shape[1] != k.shape[1]
    outputs = []
    for q_block, k_start, k_len in zip(q.split(list(blocks.q_lengths)), blocks.k_starts,
                                       blocks.k_lengths):
        q_len = q_block.shape[0]
        if q_len == 0:
            continue
        if k_len == 0:  # e.g. a segment that is all padding: nothing to attend to
            outputs.append(torch.zeros_like(q_block))
            continue
        mask, is_causal = None, False
        if blocks.causal and q_len == k_len:
            is_causal = True
        elif blocks.causal:  # bottom-right aligned causal mask, [q_len, k_len] for this block only
            mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
        # [s, h, d] -> [1, h, s, d]
        out = F.scaled_dot_product_attention(
            q_block.transpose(0, 1).unsqueeze(0),
            k.narrow(0, k_start, k_len).transpose(0, 1).unsqueeze(0),
            v.narrow(0, k_start, k_len).transpose(0, 1).unsqueeze(0),
            attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=gqa)
        outputs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outputs, dim=0) if outputs else torch.zeros_like(q)


@lru_cache(maxsize=1)
def _varlen_attn():
    """torch's ``varlen_attn`` and its keyword names, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _use_varlen(q: torch.Tensor, dropout_p: float) -> bool:
    return (q.is_cuda and dropout_p == 0.0 and q.dtype in (torch.float16, torch.bfloat16)
            and _varlen_attn() is not None)


def _varlen_blocks(q, k, v, blocks: AttentionBlocks, scale: float) -> torch.Tensor:
    """All blocks in one flash ``varlen_attn`` call (CUDA; not exercised in CI)."""
    varlen_attn, params = _varlen_attn()
    if q.shape[0] == 0:
        return torch.zeros_like(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # flash kernels need dense rows
    keep = [i for i, n in enumerate(blocks.q_lengths) if n > 0]  # flash needs no empty queries
    q_lengths = [blocks.q_lengths[i] for i in keep]
    k_lengths = [blocks.k_lengths[i] for i in keep]
    key_rows = torch.cat([torch.arange(blocks.k_starts[i], blocks.k_starts[i] + blocks.k_lengths[i],
                                       device=q.device) for i in keep])
    identity = key_rows.numel() == k.shape[0] and bool(
        (key_rows == torch.arange(k.shape[0], device=q.device)).all())
    if not identity:  # blocks share or skip keys (CP causal chunks, padding): lay them out
        k, v = k.index_select(0, key_rows), v.index_select(0, key_rows)

    def offsets(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                            device=q.device)

    kwargs = {"scale": scale}
    if "window_size" in params:  # torch >= 2.10: causal is the window (-1, 0), bottom-right
        kwargs["window_size"] = (-1, 0) if blocks.causal else (-1, -1)
    else:
        kwargs["is_causal"] = blocks.causal
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    out = varlen_attn(q, k, v, offsets(q_lengths), offsets(k_lengths), max(q_lengths),
                      max(max(k_lengths), 1), **kwargs)
    if any(n == 0 for n in k_lengths):  # rows of key-less blocks are defined as zeros
        no_keys = torch.repeat_interleave(
            torch.tensor([n == 0 for n in k_lengths], device=q.device),
            torch.tensor(q_lengths, device=q.device))
        out = out.masked_fill(no_keys[:, None, None], 0.0)
    return out
