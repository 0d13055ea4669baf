"""The packed image loader: resume exactness, DP disjointness, phase switches, random-access reads
equal to a sequential shard scan, masks, bad samples."""

import numpy as np
import pytest
import torch

from megatron_finevit.data.decode_pil import decode_pil
from megatron_finevit.data.index import build_index
from megatron_finevit.data.loader import PackedImageLoader, policy_sizes
from megatron_finevit.data.resize import ResizePolicy
from megatron_finevit.data.shards import iter_shard, list_shards
from megatron_finevit.data.synthetic import make_synthetic_shards

PHASES = [(0, ResizePolicy(max_pixels=84 * 84)), (3, ResizePolicy(max_pixels=112 * 112))]
PACK = 128


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("loader")
    make_synthetic_shards(path, 96, seed=3, samples_per_shard=32, progress=False)
    build_index(path, progress=False)
    return path


def _loader(shard_dir, **kw):
    return PackedImageLoader(shard_dir, PHASES, PACK, buffer_size=32, seed=5, use_draft=True, **kw)


def _signature(batch):
    return (tuple(batch.keys), batch.packed.patches.sum().item(),
            None if batch.mim_mask is None else tuple(batch.mim_mask.tolist()))


def test_reads_equal_sequential_scan(shard_dir):
    """Random access by tar offset gives the bytes/metadata a full shard scan gives."""
    loader = _loader(shard_dir, mask_ratio=0.75)
    scanned = {key: (img, meta) for shard in list_shards(shard_dir)
               for key, img, meta in iter_shard(shard)}
    batch = next(loader)
    for key, image, meta in zip(batch.keys, batch.images, batch.metas):
        img_bytes, want_meta = scanned[key]
        assert torch.equal(image, decode_pil(img_bytes, PHASES[0][1], use_draft=True))
        assert meta["caption"] == want_meta["caption"]
    lengths = batch.packed.image_lengths
    assert sum(lengths) <= PACK and batch.packed.patches.shape[0] == PACK
    assert batch.mim_mask.shape == (sum(lengths),)
    counts = [int(m.sum()) for m in batch.mim_mask.split(lengths)]
    assert counts == [int(np.floor(0.75 * n + 0.5)) for n in lengths]


def test_resume_is_exact_across_a_phase_switch(shard_dir):
    """state_dict after k packs -> a fresh loader yields exactly what the original yields next."""
    reference = _loader(shard_dir, mask_ratio=0.75)
    stream = []
    for step in range(7):
        reference.set_step(step)
        stream.append(_signature(next(reference)))
    first = _loader(shard_dir, mask_ratio=0.75)
    for step in range(4):  # crosses the phase switch at step 3
        first.set_step(step)
        assert _signature(next(first)) == stream[step]
    state = first.state_dict()
    resumed = _loader(shard_dir, mask_ratio=0.75)
    resumed.load_state_dict(state)
    for step in range(4, 7):
        resumed.set_step(step)
        assert _signature(next(resumed)) == stream[step]
    assert resumed.phase == 1 and max(resumed.index.height) > 0


def test_phase_changes_sizes(shard_dir):
    loader = _loader(shard_dir)
    small = policy_sizes(loader.index, PHASES[0][1], PACK + 1)
    large = policy_sizes(loader.index, PHASES[1][1], PACK + 1)
    brute = [PHASES[1][1].num_patches(int(h), int(w))
             for h, w in zip(loader.index.height, loader.index.width)]
    assert large.tolist() == brute and (large >= small).all() and (large > small).any()
    loader.set_step(3)
    assert max(max(next(loader).image_tokens) for _ in range(3)) > small.max()


def test_dp_ranks_are_disjoint_and_cover_an_epoch(shard_dir):
    seen = []
    for rank in range(2):
        loader = _loader(shard_dir, dp_rank=rank, dp_size=2)
        seen.append([key for batch in loader.epoch() for key in batch.keys])
    assert not set(seen[0]) & set(seen[1])
    assert all(len(s) == len(set(s)) for s in seen)
    assert len(seen[0]) + len(seen[1]) == 96


def test_layout_only_matches_decoded_layout(shard_dir):
    decoded, layout = _loader(shard_dir), _loader(shard_dir, decode_pixels=False)
    a, b = next(decoded), next(layout)
    assert a.keys == b.keys and b.images is None
    assert torch.equal(a.packed.cu_seqlens, b.packed.cu_seqlens)
    assert torch.equal(a.packed.grids, b.packed.grids) and not b.packed.patches.any()


def test_budget_holds_the_context_parallel_padding(shard_dir):
    """Under CP4 the encoder pads every image to a multiple of 8 (``cp_padded_length``): packs
    budgeted at that padded length fit the pack, packs budgeted at real tokens do not always."""
    from megatron_finevit.models.attention import cp_padded_length
    from megatron_finevit.models.vit import prepare_encoder_input

    pack = 64

    def epoch(**kw):
        return PackedImageLoader(shard_dir, PHASES[:1], pack, buffer_size=32, seed=5, **kw).epoch()

    def padded(batch):
        return sum(cp_padded_length(n, 4) for n in batch.image_tokens)

    assert max(padded(b) for b in epoch()) > pack  # real tokens overflow
    budgeted = epoch(token_multiple=8)
    assert sum(len(b.keys) for b in budgeted) == 96  # every sample still fits a pack
    for batch in budgeted:
        assert padded(batch) <= pack
        inp = prepare_encoder_input(batch.packed, cp_size=4, cp_rank=3, total_tokens=pack)
        assert inp.patches.shape[0] == pack // 4


def test_bad_sample_is_skipped_and_counted(shard_dir, monkeypatch):
    loader = _loader(shard_dir)
    real_read = loader.reader.read
    victim = int(next(iter(_loader(shard_dir).sampler))[0])

    def corrupt(sample):
        image, meta = real_read(sample)
        return (image[:100], meta) if sample == victim else (image, meta)

    monkeypatch.setattr(loader.reader, "read", corrupt)
    batch = next(loader)
    assert str(loader.index.key[victim]) not in batch.keys
    assert loader.counter.num_skipped == 1


def test_rejects_unknown_decoder_and_bad_phases(shard_dir):
    with pytest.raises(ValueError, match="must be one of"):  # DALI: tests/data/test_loader_dali
        PackedImageLoader(shard_dir, PHASES, PACK, decoder="nvjpeg")
    with pytest.raises(ValueError, match="step 0"):
        PackedImageLoader(shard_dir, [(2, ResizePolicy())], PACK)
