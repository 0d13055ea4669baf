"""Packed core attention across ranks: context parallel (CP = 2, 4) and, through megatron's own
``SelfAttention`` with per-token RoPE on THD packs, TP = 2, TP = 2 + SP, CP = 2, CP = 4 and
TP = 2 × CP = 2 + SP — outputs and gradients equal the single-rank run (fp32: max abs difference
≤ 1e-5 × max(1, the largest magnitude of that quantity)).

Two spawned worlds (2 and 4 ranks); each rank also computes the single-rank oracle itself.
"""

import math

import pytest
import torch
import torch.distributed as dist

from megatron_finevit.testing.multirank import run_world

TOL = 1e-5
HEADS, GROUPS, DIM = 4, 2, 16
SEED = 1234
REAL = [13, 0, 20, 6, 9, 4]  # images of different sizes, an empty slot, the pack's padding tail


def _padded(cp):
    """Per-segment lengths padded for CP (a multiple of 2·cp), as the packer emits them."""
    from megatron_finevit.models.attention import cp_padded_length

    return [cp_padded_length(n, cp) for n in REAL]


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _max_diffs(got, want):
    return max((g - w).abs().max().item() for g, w in zip(got, want))


# --- the packed_attention function under CP ----------------------------------------------------


def _function_cp_check(cp_group, cp_rank, cp_size, causal, padded):
    """CP vs CP = 1 for ``packed_attention``: output, dq, dk, dv over the whole pack."""
    from megatron_finevit.models.attention import gather_from_cp, packed_attention, partition_for_cp

    if padded:  # real lengths inside CP-padded segments (cu_seqlens_padded)
        cu_real, cu_layout = _cu(REAL), _cu(_padded(cp_size))
    else:  # segments that are multiples of 2·cp already
        cu_real = cu_layout = _cu([n * 2 * cp_size for n in (3, 0, 1, 2)])
    total = int(cu_layout[-1])
    full = [_randn(total, h, DIM, seed=s) for s, h in ((1, HEADS), (2, GROUPS), (3, GROUPS))]
    grad_out = _randn(total, HEADS, DIM, seed=4)
    kwargs = dict(causal=causal, cu_seqlens_padded=cu_layout if padded else None)

    ref_in = [x.clone().requires_grad_() for x in full]
    ref_out = packed_attention(*ref_in, cu_real, **kwargs)
    ref_grads = torch.autograd.grad(ref_out, ref_in, grad_out)

    local_in = [partition_for_cp(x, cu_layout, cp_size, cp_rank).requires_grad_() for x in full]
    local_out = packed_attention(*local_in, cu_real, cp_group=cp_group, **kwargs)
    local_grads = torch.autograd.grad(
        local_out, local_in, partition_for_cp(grad_out, cu_layout, cp_size, cp_rank))
    with torch.no_grad():
        got = [gather_from_cp(x, cu_layout, cp_group) for x in (local_out, *local_grads)]
    return {"out": _max_diffs(got[:1], [ref_out]), "grad": _max_diffs(got[1:], ref_grads),
            "grad_scale": max(g.abs().max().item() for g in ref_grads)}


# --- megatron SelfAttention with PackedCoreAttention --------------------------------------------


def _config(tp, cp, sp):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=64, num_attention_heads=HEADS, num_query_groups=GROUPS,
        kv_channels=DIM, add_bias_linear=False, add_qkv_bias=True, hidden_dropout=0.0,
        attention_dropout=0.0, tensor_model_parallel_size=tp, context_parallel_size=cp,
        sequence_parallel=sp, use_cpu_initialization=True, params_dtype=torch.float32,
        bf16=False, fp16=False, gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        init_method_std=0.2)  # outputs of order 1, so the 1e-5 tolerance is a tight one


def _build_self_attention(tp, cp, sp, mask_type):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from megatron_finevit.models.attention import PackedCoreAttention
    from megatron_finevit.platform import ParallelConfig, init_parallel, set_seed

    init_parallel(ParallelConfig(tensor_parallel=tp, context_parallel=cp, sequence_parallel=sp),
                  num_attention_heads=HEADS, num_query_groups=GROUPS)
    set_seed(SEED)
    spec = ModuleSpec(module=SelfAttention, params={"attn_mask_type": mask_type},
                      submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear,
                                                         core_attention=PackedCoreAttention,
                                                         linear_proj=RowParallelLinear))
    return build_module(spec, config=_config(tp, cp, sp), layer_number=1)


def _rope_2d_freqs(lengths):
    """Per-token 2D RoPE angles for a pack of images ``[T, 1, 1, DIM]``: each segment is a
    w-wide grid, half of the rotary pairs turn with the row, half with the column (megatron's
    non-interleaved layout: the angle table repeated twice)."""
    inv_freq = 1.0 / (100.0 ** (torch.arange(DIM // 4) / (DIM // 4)))
    rows = []
    for n in lengths:
        w = max(1, int(math.sqrt(n)))
        pos = torch.arange(n)
        angles = torch.cat([(pos // w)[:, None] * inv_freq, (pos % w)[:, None] * inv_freq], -1)
        rows.append(torch.cat([angles, angles], -1))
    return torch.cat(rows)[:, None, None, :].float()


def _self_attention_step(model, hidden, grad_out, freqs, params):
    hidden = hidden.detach().requires_grad_()
    out, bias = model(hidden, None, rotary_pos_emb=freqs, packed_seq_params=params)
    assert bias is None
    out.backward(grad_out)
    return out.detach(), hidden.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


def _self_attention_runs(runs, mask_types):
    """Each run (tp, cp, sp) and mask type vs the TP = CP = 1 run of the same weights."""
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_finevit.models.attention import gather_from_cp, partition_for_cp
    from megatron_finevit.testing.gpt_parity import oracle_shard

    max_cp = max(cp for _, cp, _ in runs)
    padded = _padded(max_cp)
    cu_real, cu_layout = _cu(REAL), _cu(padded)
    total = int(cu_layout[-1])
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_real, cu_seqlens_kv=cu_real,
                             cu_seqlens_q_padded=cu_layout, cu_seqlens_kv_padded=cu_layout,
                             max_seqlen_q=max(padded), max_seqlen_kv=max(padded))
    freqs = _rope_2d_freqs(padded)  # the full pack's table, on every CP rank
    hidden = _randn(total, 1, 64, seed=5)
    grad_out = _randn(total, 1, 64, seed=6)
    report = {}
    for mask_type in mask_types:
        oracle_model = _build_self_attention(1, 1, False, mask_type)
        weights = {n: p.detach().clone() for n, p in oracle_model.named_parameters()}
        ref_out, ref_dx, ref_grads = _self_attention_step(
            oracle_model, hidden, grad_out, freqs, params)
        for tp, cp, sp in runs:
            model = _build_self_attention(tp, cp, sp, mask_type)
            tp_rank, cp_rank = ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank()
            tp_group = ps.get_tensor_model_parallel_group()
            cp_group = ps.get_context_parallel_group()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(oracle_shard(weights[name], p, name, tp, tp_rank))

            def shard(x):  # full pack -> this rank's tokens (CP layout, then SP slice)
                x = partition_for_cp(x, cu_layout, cp, cp_rank)
                return x.chunk(tp, dim=0)[tp_rank] if sp else x

            def unshard(x):
                if sp:
                    parts = [torch.empty_like(x) for _ in range(tp)]
                    dist.all_gather(parts, x.contiguous(), group=tp_group)
                    x = torch.cat(parts)
                return gather_from_cp(x, cu_layout, cp_group if cp > 1 else None)

            out, dx, grads = _self_attention_step(
                model, shard(hidden), shard(grad_out), freqs, params)
            with torch.no_grad():
                out, dx = unshard(out), unshard(dx)
            grad_diff = 0.0
            for name, p in model.named_parameters():
                g = grads[name]
                if cp > 1:  # every CP rank holds part of the weight gradient (DDP sums them)
                    dist.all_reduce(g, group=cp_group)
                want = oracle_shard(ref_grads[name], p, name, tp, tp_rank)
                grad_diff = max(grad_diff, (g - want).abs().max().item())
            label = f"tp{tp}_cp{cp}" + ("_sp" if sp else "") + f"_{mask_type.name}"
            report[label] = {"out": (out - ref_out).abs().max().item(),
                             "dx": (dx - ref_dx).abs().max().item(), "dw": grad_diff,
                             "params": len(grads), "out_scale": ref_out.abs().max().item(),
                             "dx_scale": ref_dx.abs().max().item(),
                             "dw_scale": max(g.abs().max().item() for g in ref_grads.values())}
            if cp == 2 and tp == 1:  # the documented pitfall: this rank's rows of freqs instead
                with torch.no_grad():
                    local_freqs = partition_for_cp(freqs, cu_layout, cp, cp_rank)
                    wrong, _ = model(shard(hidden), None, rotary_pos_emb=local_freqs,
                                     packed_seq_params=params)
                    report[label]["local_freqs_out"] = (unshard(wrong) - ref_out).abs().max().item()
    return report


def _dropout_check():
    """Attention dropout runs in training (through megatron's RNG tracker) and is off in eval."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_finevit.models.attention import PackedCoreAttention, packed_attention
    from megatron_finevit.platform import ParallelConfig, init_parallel, set_seed

    init_parallel(ParallelConfig())
    set_seed(SEED)
    config = _config(1, 1, False)
    config.attention_dropout = 0.5
    attention = PackedCoreAttention(config, 1, AttnMaskType.no_mask, "self")
    cu = _cu(REAL)
    q, k, v = (_randn(int(cu[-1]), h, DIM, seed=s)
               for s, h in ((7, HEADS), (8, GROUPS), (9, GROUPS)))
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    plain = packed_attention(q, k, v, cu, causal=False).reshape(q.shape[0], -1)
    attention.eval()
    evaluated = attention(q, k, v, None, packed_seq_params=params)
    attention.train()
    first, second = (attention(q, k, v, None, packed_seq_params=params) for _ in range(2))
    return {"eval": (evaluated - plain).abs().max().item(),
            "train": (first - plain).abs().max().item(),
            "draws": (first - second).abs().max().item()}


def _sbhd_cp_check(cp_group, cp_rank, cp_size):
    """Unpacked [s, b, h, d] input under CP (megatron's per-sequence chunks r and 2cp-1-r) equals
    the single-rank module, bidirectional and causal."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_finevit.models.attention import PackedCoreAttention, merge_cp_partitions
    from megatron_finevit.models.attention import partition_for_cp

    s, b = 8 * cp_size, 3
    q, k, v = (_randn(s, b, h, DIM, seed=s_) for s_, h in ((10, HEADS), (11, GROUPS), (12, GROUPS)))
    diffs = {}
    for mask_type in (AttnMaskType.no_mask, AttnMaskType.causal):
        single = PackedCoreAttention(_config(1, 1, False), 1, mask_type, "self",
                                     pg_collection=ProcessGroupCollection())(q, k, v, None)
        parallel = PackedCoreAttention(_config(1, cp_size, False), 1, mask_type, "self",
                                       pg_collection=ProcessGroupCollection(cp=cp_group))
        local = parallel(*(partition_for_cp(x, [0, s], cp_size, cp_rank) for x in (q, k, v)), None)
        parts = [torch.empty_like(local) for _ in range(cp_size)]
        dist.all_gather(parts, local.contiguous(), group=cp_group)
        diffs[mask_type.name] = (merge_cp_partitions(parts, [0, s]) - single).abs().max().item()
    return diffs


def world(rank, world_size, runs):
    from megatron.core.transformer.enums import AttnMaskType

    report = {}
    group = dist.group.WORLD
    for causal in (False, True):
        for padded in (False, True):
            report[f"fn_cp{world_size}_causal{causal}_padded{padded}"] = _function_cp_check(
                group, rank, world_size, causal, padded)
    report["sbhd"] = _sbhd_cp_check(group, rank, world_size)
    report.update(_self_attention_runs(runs, (AttnMaskType.no_mask, AttnMaskType.causal)))
    report["dropout"] = _dropout_check()
    return report


RUNS_2 = [(2, 1, False), (2, 1, True), (1, 2, False)]  # (tp, cp, sequence parallel)
RUNS_4 = [(1, 4, False), (2, 2, True)]


@pytest.fixture(scope="module")
def reports():
    return {2: run_world(world, 2, args=(RUNS_2,)), 4: run_world(world, 4, args=(RUNS_4,))}


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_packed_attention_cp_equals_single_rank(reports, cp, causal, padded):
    for per_rank in reports[cp]:
        d = per_rank[f"fn_cp{cp}_causal{causal}_padded{padded}"]
        assert d["grad_scale"] > 1e-2  # gradients are not trivially zero
        assert d["out"] <= TOL and d["grad"] <= TOL, d


@pytest.mark.parametrize("world_size,run", [(2, r) for r in RUNS_2] + [(4, r) for r in RUNS_4])
@pytest.mark.parametrize("mask", ["no_mask", "causal"])
def test_self_attention_parallel_equals_single_rank(reports, world_size, run, mask):
    tp, cp, sp = run
    label = f"tp{tp}_cp{cp}" + ("_sp" if sp else "") + f"_{mask}"
    for per_rank in reports[world_size]:
        d = per_rank[label]
        assert d["params"] == 3  # qkv weight + bias, proj weight
        for key in ("out", "dx", "dw"):  # fp32: 1e-5 of the quantity's own scale (>= 1)
            assert d[f"{key}_scale"] > 0.5, (label, d)  # outputs and gradients of order one
            assert d[key] <= TOL * max(1.0, d[f"{key}_scale"]), (label, key, d)
        if "local_freqs_out" in d:  # RoPE under CP needs the full pack's freqs (see docs)
            assert d["local_freqs_out"] > 1e-2, d


def test_attention_dropout_in_training_only(reports):
    d = reports[2][0]["dropout"]
    assert d["eval"] <= 1e-6 and d["train"] > 0.1 and d["draws"] > 0.1, d


@pytest.mark.parametrize("cp", [2, 4])
def test_unpacked_sbhd_cp_equals_single_rank(reports, cp):
    for per_rank in reports[cp]:
        assert max(per_rank["sbhd"].values()) <= TOL, per_rank["sbhd"]
