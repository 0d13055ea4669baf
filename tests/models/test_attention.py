"""Packed core attention on one process: packed equals per-segment, no cross-segment leakage,
memory per segment, the CP layout helpers, and the megatron module's THD/SBHD entry points.
Multi-rank checks (CP, TP, through megatron's SelfAttention) are in test_attention_parallel.py."""

import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.profiler import ProfilerActivity, profile

from megatron_finevit.models.attention import (
    PackedCoreAttention,
    cp_cu_seqlens,
    cp_padded_length,
    cp_partition_index,
    merge_cp_partitions,
    packed_attention,
    partition_for_cp,
)

HEADS, GROUPS, DIM = 4, 2, 8
# image-like segments of different sizes, an empty one (kept by the packer for fixed shapes), a
# single token, and the pack's padding tail as its own segment
LENGTHS = [5, 0, 12, 1, 7, 3]


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _qkv(total, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(total, h, DIM, generator=g, dtype=dtype).requires_grad_()
            for h in (HEADS, GROUPS, GROUPS)]


def _reference_segment(q, k, v, causal):
    """softmax(q kᵀ / sqrt(d)) v of ONE sequence with explicit matrices, GQA expanded by hand."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[0]
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _per_segment(q, k, v, lengths, causal):
    """Every segment run alone, then concatenated: the oracle for the packed result."""
    outs = [_reference_segment(qs, ks, vs, causal)
            for qs, ks, vs, n in zip(q.split(lengths), k.split(lengths), v.split(lengths), lengths)
            if n > 0]
    return torch.cat(outs)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_equals_per_segment_with_gradients(causal):
    q, k, v = _qkv(sum(LENGTHS))
    grad_out = torch.randn(sum(LENGTHS), HEADS, DIM, dtype=torch.float64)
    packed = packed_attention(q, k, v, _cu(LENGTHS), causal=causal)
    packed_grads = torch.autograd.grad(packed, (q, k, v), grad_out)
    reference = _per_segment(q, k, v, LENGTHS, causal)
    reference_grads = torch.autograd.grad(reference, (q, k, v), grad_out)
    torch.testing.assert_close(packed, reference, rtol=0, atol=1e-12)
    for got, want in zip(packed_grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # the reference is not trivially equal to attending over the whole pack
    whole = _reference_segment(q, k, v, causal)
    assert (whole - reference).abs().max() > 1e-2


@pytest.mark.parametrize("causal", [False, True])
def test_padded_segments_attend_only_to_their_real_tokens(causal):
    """cu_seqlens_padded (megatron/TE): segments carry trailing padding that is never attended."""
    real, padded = [5, 0, 3, 8, 2], [8, 0, 8, 8, 4]
    q, k, v = _qkv(sum(padded))
    out = packed_attention(q, k, v, _cu(real), cu_seqlens_padded=_cu(padded), causal=causal)
    starts = _cu(padded).tolist()
    for start, n in zip(starts, real):
        if n == 0:
            continue
        rows = slice(start, start + n)
        want = _reference_segment(q[rows], k[rows], v[rows], causal)
        torch.testing.assert_close(out[rows], want, rtol=0, atol=1e-12)
    # a bidirectional segment of only padding has nothing to attend to: zeros, not NaN
    all_pad = packed_attention(q[:4], k[:4], v[:4], [0, 0], cu_seqlens_padded=[0, 4], causal=False)
    assert torch.equal(all_pad, torch.zeros_like(all_pad))


@pytest.mark.parametrize("causal", [False, True])
def test_no_cross_segment_leakage(causal):
    cu = _cu(LENGTHS)
    q, k, v = (x.detach() for x in _qkv(sum(LENGTHS)))
    base = packed_attention(q, k, v, cu, causal=causal)
    bounds = cu.tolist()
    for seg, n in enumerate(LENGTHS):
        if n == 0:
            continue
        rows = torch.zeros(sum(LENGTHS), dtype=torch.bool)
        rows[bounds[seg]:bounds[seg + 1]] = True
        k2, v2 = k.clone(), v.clone()
        k2[rows] += torch.randn_like(k2[rows])
        v2[rows] += 1.0
        out = packed_attention(q, k2, v2, cu, causal=causal)
        assert torch.equal(out[~rows], base[~rows]), f"segment {seg} leaked into others"
        assert (out[rows] - base[rows]).abs().max() > 1e-3, f"segment {seg} ignored its own keys"


@pytest.mark.parametrize("causal", [False, True])
def test_memory_is_per_segment(monkeypatch, causal):
    """No [T, T] anything: every attention call is one segment's, and the largest allocation in
    forward + backward is of the order of the output (linear in T), not the pack's score matrix."""
    n_seg, seg = 16, 64
    total = n_seg * seg
    q, k, v = _qkv(total, dtype=torch.float32)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, key, value, *args, **kwargs):
        calls.append((query.shape[-2], key.shape[-2]))
        if kwargs.get("attn_mask") is not None:
            calls.append(tuple(kwargs["attn_mask"].shape))
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    cu = [i * seg for i in range(n_seg + 1)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        packed_attention(q, k, v, cu, causal=causal).sum().backward()
    assert len(calls) == n_seg and all(c == (seg, seg) for c in calls), calls
    largest = max(e.cpu_memory_usage for e in prof.events())
    output_bytes = total * HEADS * DIM * 4
    pack_scores_bytes = HEADS * total * total * 4
    assert 0 < largest <= 2 * output_bytes < pack_scores_bytes / 16, (largest, output_bytes)


# --- the context-parallel layout -----------------------------------------------------------------


def _te_partition_formula(cu, total, cp, rank):
    """Transformer Engine's ``thd_get_partitioned_indices`` rule, token by token: local token
    ``i`` of local segment ``s`` (halves of length h) comes from chunk rank (first half) or
    2cp-1-rank (second half) of global segment s."""
    local_cu = [c // cp for c in cu]
    out = []
    for i in range(total // cp):
        s = max(j for j in range(len(local_cu) - 1)
                if local_cu[j] <= i < local_cu[j + 1])
        idx, half = i - local_cu[s], (local_cu[s + 1] - local_cu[s]) // 2
        chunk = rank if idx < half else 2 * cp - 1 - rank
        out.append(cu[s] + chunk * half + idx % half)
    return out


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_partition_matches_te_and_megatron_rope(cp):
    from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank

    lengths = [cp_padded_length(n, cp) for n in (5, 0, 13, 8, 1)]
    assert all(p % (2 * cp) == 0 and p >= n for p, n in zip(lengths, (5, 0, 13, 8, 1)))
    cu = _cu(lengths)
    total = int(cu[-1])
    full = torch.arange(total)
    parts = []
    for rank in range(cp):
        index = cp_partition_index(cu, cp, rank)
        assert index.tolist() == _te_partition_formula(cu.tolist(), total, cp, rank)
        # megatron's RoPE picks exactly these rows of a full-pack per-token freqs table
        local_lengths = (cp_cu_seqlens(cu, cp).diff()).tolist()
        rope_rows = torch.cat([
            _get_thd_freqs_on_this_cp_rank(rank, cp, torch.empty(n), full, int(start))
            for n, start in zip(local_lengths, cu[:-1])])
        assert torch.equal(rope_rows, index)
        parts.append(partition_for_cp(full, cu, cp, rank))
    assert torch.equal(merge_cp_partitions(parts, cu), full)
    assert torch.equal(cp_cu_seqlens(cu, cp), cu // cp)


def test_cp_layout_errors_are_clear():
    with pytest.raises(ValueError, match="multiple of 2\\*cp = 4"):
        cp_partition_index([0, 4, 10], 2, 0)
    with pytest.raises(ValueError, match="start at 0"):
        cp_partition_index([1, 4], 2, 0)
    q, k, v = _qkv(10)
    with pytest.raises(ValueError, match="padding tail of a pack must be its own segment"):
        packed_attention(q, k, v, [0, 4, 8], causal=False)


# --- the megatron module ------------------------------------------------------------------------


def _config(**kw):
    return TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                             num_query_groups=GROUPS, kv_channels=DIM, attention_dropout=0.0,
                             use_cpu_initialization=True, **kw)


def _module(mask_type):
    return PackedCoreAttention(_config(), layer_number=1, attn_mask_type=mask_type,
                               attention_type="self", pg_collection=ProcessGroupCollection())


@pytest.mark.parametrize("mask_type,causal", [(AttnMaskType.no_mask, False),
                                              (AttnMaskType.padding, False),
                                              (AttnMaskType.causal, True),
                                              (AttnMaskType.padding_causal, True)])
def test_module_thd_and_sbhd(mask_type, causal):
    attention = _module(mask_type)
    q, k, v = (x.detach().float() for x in _qkv(sum(LENGTHS)))
    cu = _cu(LENGTHS)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(LENGTHS), max_seqlen_kv=max(LENGTHS))
    out = attention(q, k, v, None, attn_mask_type=mask_type, packed_seq_params=params)
    assert out.shape == (sum(LENGTHS), HEADS * DIM)
    want = _per_segment(q, k, v, LENGTHS, causal).reshape(sum(LENGTHS), -1)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    if mask_type in (AttnMaskType.no_mask, AttnMaskType.causal):  # SBHD: [s, b, h, d]
        s, b = 6, 3
        qs, ks, vs = (x[: s * b].reshape(b, s, *x.shape[1:]).transpose(0, 1) for x in (q, k, v))
        out = attention(qs, ks, vs, None)
        assert out.shape == (s, b, HEADS * DIM)
        for col in range(b):
            want = _reference_segment(qs[:, col], ks[:, col], vs[:, col], causal)
            torch.testing.assert_close(out[:, col], want.reshape(s, -1), rtol=0, atol=1e-6)


def test_module_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="cp_comm_type='p2p'"):
        PackedCoreAttention(_config(), 1, AttnMaskType.causal, "self", cp_comm_type="p2p",
                            pg_collection=ProcessGroupCollection())
    with pytest.raises(ValueError, match="supports"):
        _module(AttnMaskType.arbitrary)
    q = torch.zeros(4, 2, HEADS, DIM)
    with pytest.raises(NotImplementedError, match="pack the sequences"):
        _module(AttnMaskType.padding)(q, q[..., :GROUPS, :], q[..., :GROUPS, :], None)
