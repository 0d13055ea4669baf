"""DALI decode in the packed loader: the same packs, skips and counts as PIL (with a truncated
JPEG and an all-bad pack among them, across a phase switch), pixels within the decoder bound,
pipeline stages that agree on the packs with DALI on the first stage and PIL on the last, exact
resume with packs in DALI's prefetch, ``auto`` selection and the config check."""

import sys

import pytest
import torch

from megatron_finevit.data.decode_dali_packs import resolve_decoder
from megatron_finevit.data.loader import PackedImageLoader
from megatron_finevit.data.pack_agreement import PipelineGroup
from megatron_finevit.data.resize import ResizePolicy
from megatron_finevit.testing.corrupt_shards import loader_steps, shards_with_broken_packs
from megatron_finevit.testing.multirank import run_world
from megatron_finevit.training.stages.vision import DataSection, _data_problems

pytest.importorskip("nvidia.dali")

PHASES = [(0, ResizePolicy(max_pixels=84 * 84)), (3, ResizePolicy(max_pixels=112 * 112))]
PACK = 128
STEPS = 6           # crosses the phase switch at step 3
MAX_ABS_TOL = 0.25  # tests/data/test_decoders.py: DALI vs PIL, per pixel
MEAN_ABS_TOL = 0.01


def _loader(shard_dir, decoder="pil", **kw):
    return PackedImageLoader(shard_dir, PHASES, PACK, buffer_size=32, seed=5, mask_ratio=0.75,
                             decoder=decoder, **kw)



@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """64 samples; the second pack holds one truncated JPEG, every sample of the third is one."""
    return shards_with_broken_packs(tmp_path_factory.mktemp("dali"), _loader)


@pytest.fixture(scope="module")
def reference(shard_dir):
    """The PIL stream (in process) and its bad-sample counts."""
    with _loader(shard_dir) as loader:
        return loader_steps(loader, 0, STEPS), loader.counter.totals()


def _assert_same_packs(got, want, pixel_tol=None):
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        assert (a.keys, a.samples, a.pack_number, a.captions) == \
            (b.keys, b.samples, b.pack_number, b.captions)
        assert torch.equal(a.packed.cu_seqlens, b.packed.cu_seqlens)
        assert torch.equal(a.packed.grids, b.packed.grids)
        assert torch.equal(a.mim_mask, b.mim_mask)
        for x, y in zip(a.images, b.images, strict=True):
            assert x.shape == y.shape
        diff = (a.packed.patches - b.packed.patches).abs()
        if pixel_tol is None:
            assert torch.equal(a.packed.patches, b.packed.patches)
        else:
            assert diff.max() < pixel_tol
            worst = max(worst, diff.mean().item())
    assert worst < MEAN_ABS_TOL, worst


def test_dali_packs_equal_pil(shard_dir, reference):
    batches, totals = reference
    with _loader(shard_dir, "dali") as loader:
        assert loader.decoder == "dali" and loader._dali.device == "cpu"
        _assert_same_packs(loader_steps(loader, 0, STEPS), batches, MAX_ABS_TOL)
        assert loader.counter.totals() == totals
        assert loader._dali.fallbacks >= 2  # the truncated JPEGs went through the PIL fallback
    assert totals["skipped_by_reason"]["truncated_image"] >= 2  # the bad data was reached
    assert [b.pack_number for b in batches[:3]] == [1, 2, 4]    # pack 3 (all bad) skipped


def _layout(batch) -> tuple:
    return (batch.keys, batch.pack_number, batch.packed.cu_seqlens.tolist(),
            batch.packed.grids.tolist(), batch.mim_mask.tolist())


def pp3_world(rank, world_size, shard_dir):
    """PP3: DALI decodes on the first stage, the middle one reads layouts, PIL on the last."""
    import torch.distributed as dist

    pipeline = PipelineGroup(dist.new_group([0, 1, 2]), leader=0)
    decoder = {0: "dali", 1: "pil", 2: "pil"}[rank]
    with _loader(shard_dir, decoder, decode_pixels=rank != 1, pipeline=pipeline) as loader:
        layouts = []
        for step in range(STEPS):
            loader.set_step(step)
            loader.prepare(1)
            layouts.append(_layout(next(loader)))
        return layouts, loader.counter.totals(), loader.state_dict()


def test_pipeline_stages_agree_with_dali_first(shard_dir, reference):
    batches, totals = reference
    ranks = run_world(pp3_world, 3, args=(shard_dir,))
    for layouts, _, state in ranks:
        assert layouts == [_layout(b) for b in batches]
        assert state == ranks[0][2]
    assert ranks[0][1] == totals  # the first stage skipped and counted as PIL does


@pytest.mark.parametrize("stop_at", [1, 4])
def test_resume_with_packs_in_prefetch(shard_dir, stop_at):
    """The state saved while DALI decodes the next packs is the consumer's position."""
    with _loader(shard_dir, "dali") as loader:
        whole = loader_steps(loader, 0, STEPS)
    with _loader(shard_dir, "dali") as loader:
        loader_steps(loader, 0, stop_at)
        assert len(loader._in_flight) > 0  # packs drawn ahead, in DALI
        state = loader.state_dict()
        after = loader_steps(loader, stop_at, STEPS)  # saving did not disturb the stream
    _assert_same_packs(after, whole[stop_at:])
    with _loader(shard_dir, "dali") as resumed:
        resumed.load_state_dict(state)
        _assert_same_packs(loader_steps(resumed, stop_at, STEPS), whole[stop_at:])


def test_auto_selection(monkeypatch):
    assert resolve_decoder("auto")[0] == "dali"
    assert resolve_decoder("pil") == ("pil", "asked for")
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import now fails
    decoder, why = resolve_decoder("auto")
    assert decoder == "pil" and "does not import" in why
    with pytest.raises(ValueError, match="nvidia-dali"):
        resolve_decoder("dali")


def test_invalid_decoder_is_a_config_error(shard_dir):
    assert _data_problems(DataSection(decoder="auto")) == []
    problems = _data_problems(DataSection(decoder="nvjpeg"))
    assert len(problems) == 1 and "decoder='nvjpeg'" in problems[0] and "auto" in problems[0]
    with pytest.raises(ValueError, match="must be one of"):
        _loader(shard_dir, "nvjpeg")
