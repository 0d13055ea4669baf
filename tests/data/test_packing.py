"""Packing: first-fit-decreasing vs a plain reference, epoch coverage, DP shards, exact resume."""

import json

import numpy as np
import pytest
import torch

from megatron_finevit.data.packing import (PackedBatchSampler, first_fit_decreasing,
                                           pack_layout)


def reference_ffd(sizes, budget):
    """Textbook first-fit-decreasing on Python lists (the oracle for the vectorised version)."""
    sizes = [tuple(s) if np.ndim(s) else (s,) for s in np.asarray(sizes).tolist()]
    budget = tuple(np.atleast_1d(budget).tolist())
    key = [max(s / b for s, b in zip(size, budget)) for size in sizes]
    order = sorted(range(len(sizes)), key=lambda i: -key[i])  # sorted() is stable
    bins, free = [], []
    for i in order:
        for b, room in enumerate(free):
            if all(s <= r for s, r in zip(sizes[i], room)):
                bins[b].append(i)
                free[b] = tuple(r - s for r, s in zip(room, sizes[i]))
                break
        else:
            bins.append([i])
            free.append(tuple(r - s for r, s in zip(budget, sizes[i])))
    return bins


def image_like_sizes(n, seed=0):
    """Patch counts of multiples of 4 (2×2 merge), spread like native-resolution images."""
    rng = np.random.default_rng(seed)
    return 4 * rng.integers(16, 400, size=n)


def epoch_packs(sampler):
    return [list(p) for p in sampler]


def take(sampler, k, epochs):
    """Up to `k` packs, crossing into later epochs, never pulling a pack beyond the k-th."""
    out = []
    while len(out) < k and sampler.epoch < epochs:
        for pack in sampler:
            out.append(pack)
            if len(out) == k:
                break
    return out


@pytest.mark.parametrize("dims", [1, 2])
def test_ffd_matches_reference_and_respects_budget(dims):
    rng = np.random.default_rng(dims)
    budget = [100, 70][:dims]
    for trial in range(30):
        n = int(rng.integers(1, 60))
        sizes = np.stack([rng.integers(1, b + 1, size=n) for b in budget], axis=1)
        sizes = sizes[:, 0] if dims == 1 else sizes
        bins = first_fit_decreasing(sizes, budget if dims > 1 else budget[0])
        assert [b.tolist() for b in bins] == reference_ffd(sizes, budget)
        packed = np.concatenate(bins)
        assert sorted(packed.tolist()) == list(range(n))
        sizes2d = sizes.reshape(n, dims)
        for b in bins:
            assert (sizes2d[b].sum(axis=0) <= budget).all()


def test_ffd_near_optimal_on_small_instances():
    """FFD uses at most 11/9·OPT + 6/9 bins; OPT found by brute force over assignments."""
    import itertools
    rng = np.random.default_rng(3)
    for _ in range(20):
        sizes = rng.integers(1, 11, size=7)
        best = len(sizes)
        for assign in itertools.product(range(4), repeat=len(sizes)):
            loads = np.bincount(assign, weights=sizes, minlength=4)
            if (loads <= 10).all():
                best = min(best, int((loads > 0).sum()))
        assert len(first_fit_decreasing(sizes, 10)) <= 11 / 9 * best + 6 / 9


def test_epoch_covers_every_sample_once_and_skips_oversize():
    sizes = image_like_sizes(3000)
    sizes[[5, 77, 1234]] = 5000  # larger than the budget
    sampler = PackedBatchSampler(sizes, 4096, buffer_size=256, seed=1)
    assert sampler.num_oversize == 3
    packs = epoch_packs(sampler)
    assert sampler.epoch == 1
    flat = np.concatenate(packs)
    assert sorted(flat.tolist()) == sorted(set(range(3000)) - {5, 77, 1234})
    assert all(len(p) > 0 and sizes[p].sum() <= 4096 for p in packs)
    # Reported efficiency equals the one computed from the packs themselves.
    assert sampler.stats.efficiency == pytest.approx(sizes[flat].sum() / (len(packs) * 4096))
    assert sampler.stats.efficiency >= 0.97


def test_oversize_error_mode():
    with pytest.raises(ValueError, match="exceed the token budget"):
        PackedBatchSampler([10, 200], 100, oversize="error")


def test_deterministic_by_seed_and_epochs_reshuffle():
    sizes = image_like_sizes(1500, seed=2)
    a = PackedBatchSampler(sizes, 4096, buffer_size=128, seed=7)
    b = PackedBatchSampler(sizes, 4096, buffer_size=128, seed=7)
    c = PackedBatchSampler(sizes, 4096, buffer_size=128, seed=8)
    a0, a1 = epoch_packs(a), epoch_packs(a)
    assert a0 == epoch_packs(b) and a1 == epoch_packs(b)
    assert a0 != epoch_packs(c)
    assert a0 != a1
    assert sorted(np.concatenate(a1).tolist()) == list(range(1500))


def test_data_parallel_ranks_get_disjoint_shards_covering_the_epoch():
    sizes = image_like_sizes(2000, seed=4)
    dp_size = 3
    per_rank = [np.concatenate(epoch_packs(
        PackedBatchSampler(sizes, 4096, buffer_size=200, seed=5, dp_rank=r, dp_size=dp_size)))
        for r in range(dp_size)]
    for r in range(dp_size):
        for q in range(r + 1, dp_size):
            assert not set(per_rank[r].tolist()) & set(per_rank[q].tolist())
    assert sorted(np.concatenate(per_rank).tolist()) == list(range(2000))
    # Balanced shards: sample counts within one of each other.
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1


@pytest.mark.parametrize("dims", [1, 2])
def test_resume_continues_exactly_like_the_uninterrupted_run(dims):
    sizes = image_like_sizes(1200, seed=6)
    budget = 4096
    if dims == 2:  # image patches and an LLM sequence (merged patches + text) per sample
        text = np.random.default_rng(6).integers(8, 300, size=len(sizes))
        sizes = np.stack([sizes, sizes // 4 + text], axis=1)
        budget = [4096, 1536]
    kwargs = dict(buffer_size=96, seed=11, dp_rank=1, dp_size=2)
    reference = PackedBatchSampler(sizes, budget, **kwargs)
    full = take(reference, float("inf"), epochs=2)  # two epochs, uninterrupted
    epoch0 = len(take(PackedBatchSampler(sizes, budget, **kwargs), float("inf"), epochs=1))
    for k in [0, 1, 5, 17, epoch0 - 1, epoch0, epoch0 + 3]:
        run = PackedBatchSampler(sizes, budget, **kwargs)
        seen = take(run, k, epochs=2)
        state = json.loads(json.dumps(run.state_dict()))  # plain types only
        resumed = PackedBatchSampler(sizes, budget, **kwargs)
        resumed.load_state_dict(state)
        rest = take(resumed, len(full) - k, epochs=2)
        assert seen + rest == full, f"resume after {k} packs diverged"
        assert resumed.epoch == reference.epoch == 2
        assert resumed.stats.state_dict() == reference.stats.state_dict()


def test_resume_mid_epoch_repeats_and_skips_nothing():
    sizes = image_like_sizes(800, seed=9)
    first = PackedBatchSampler(sizes, 4096, buffer_size=64, seed=3)
    it = iter(first)
    head = [next(it) for _ in range(13)]
    second = PackedBatchSampler(sizes, 4096, buffer_size=64, seed=3)
    second.load_state_dict(first.state_dict())
    tail = epoch_packs(second)
    flat = np.concatenate(head + tail).tolist()
    assert sorted(flat) == list(range(800))  # nothing repeated, nothing skipped


def test_load_state_refuses_a_different_configuration():
    sizes = image_like_sizes(300)
    state = PackedBatchSampler(sizes, 4096, seed=1).state_dict()
    with pytest.raises(ValueError, match="different configuration"):
        PackedBatchSampler(sizes, 4096, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="different configuration"):
        PackedBatchSampler(sizes, 4096, seed=1, dp_rank=0, dp_size=2).load_state_dict(state)


def test_two_budgets_are_both_respected():
    rng = np.random.default_rng(12)
    vit = 4 * rng.integers(16, 400, size=1000)
    llm = vit // 4 + rng.integers(1, 900, size=1000)  # text-heavy samples hit the LLM budget
    sizes = np.stack([vit, llm], axis=1)
    sampler = PackedBatchSampler(sizes, [4096, 2048], buffer_size=128, seed=0)
    packs = epoch_packs(sampler)
    assert sorted(np.concatenate(packs).tolist()) == list(range(1000))
    for p in packs:
        assert sizes[p, 0].sum() <= 4096 and sizes[p, 1].sum() <= 2048
    eff = sampler.stats.efficiency_per_budget
    assert eff[1] == pytest.approx(llm.sum() / (len(packs) * 2048))


def test_pack_layout_pads_tail_as_its_own_segment():
    layout = pack_layout([12, 40, 8], 64)
    assert layout.cu_seqlens.dtype == torch.int32
    assert layout.cu_seqlens.tolist() == [0, 12, 52, 60, 64]
    assert (layout.num_samples, layout.num_real_tokens, layout.num_pad_tokens) == (3, 60, 4)
    assert layout.max_seqlen == 40
    full = pack_layout([32, 32], 64)
    assert full.cu_seqlens.tolist() == [0, 32, 64] and full.num_pad_tokens == 0
    fixed = pack_layout([12, 40], 64, num_segments=6)
    assert fixed.cu_seqlens.tolist() == [0, 12, 52, 64, 64, 64, 64]
    # Segment lengths recovered from cu_seqlens are the samples, then the pad.
    assert torch.diff(fixed.cu_seqlens).tolist()[:3] == [12, 40, 12]
    with pytest.raises(ValueError):
        pack_layout([40, 30], 64)
    with pytest.raises(ValueError):
        pack_layout([10, 10, 10], 64, num_segments=3)
