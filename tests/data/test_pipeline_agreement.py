"""Every pipeline stage's loader yields the same pack contents as the first stage, whatever fails to
decode: at PP2 (decoding first stage, layout-only last stage, as Stage II) and PP3 (decoding first
and last, layout-only middle, as Stage I), over a data set whose index holds JPEGs with a cut body
(one in a pack, and every sample of another pack). The oracle is a single loader without
pipeline parallelism, which decodes everything itself. A failure on the first stage ends every
stage with an error instead of a hang."""

import pytest

from megatron_finevit.data.bad_samples import BadSampleCounter
from megatron_finevit.data.index import build_index
from megatron_finevit.data.loader import PackedImageLoader
from megatron_finevit.data.pack_agreement import (
    Decision,
    PackChoice,
    PipelineGroup,
    decode_decision,
    encode_decision,
)
from megatron_finevit.data.resize import ResizePolicy
from megatron_finevit.data.synthetic import make_synthetic_shards
from megatron_finevit.testing.corrupt_shards import next_pack_keys, truncate_image_bodies
from megatron_finevit.testing.multirank import run_world

PHASES = [(0, ResizePolicy(max_pixels=84 * 84))]
STEPS, MICRO_BATCHES = 3, 2


def _loader(shard_dir, **kw):
    return PackedImageLoader(shard_dir, PHASES, 128, buffer_size=32, seed=5, use_draft=True,
                             mask_ratio=0.5, **kw)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    """(shard dir, pack plan, broken keys): pack 1 has one cut JPEG, pack 3 only cut JPEGs, pack 6
    one more."""
    path = tmp_path_factory.mktemp("pipeline_agreement")
    make_synthetic_shards(path, 64, seed=4, samples_per_shard=32, progress=False)
    build_index(path, progress=False)
    plan = next_pack_keys(_loader(path), 8)
    broken = [plan[0][0], *plan[2], plan[5][-1]]
    truncate_image_bodies(path, broken)
    assert next_pack_keys(_loader(path), 8) == plan  # still indexed: the same packs
    return path, plan, broken


def _contents(batch) -> dict:
    return {"keys": batch.keys, "captions": batch.captions, "pack": batch.pack_number,
            "cu_seqlens": batch.packed.cu_seqlens.tolist(), "grids": batch.packed.grids.tolist(),
            "mask": batch.mim_mask.tolist(), "pixels": float(batch.packed.patches.double().sum())}


def _steps(loader, prepare: bool) -> list[dict]:
    """The micro-batches of STEPS training steps, agreed on step by step as the trainer does."""
    batches = []
    for _ in range(STEPS):
        if prepare:
            loader.prepare(MICRO_BATCHES)
        batches += [_contents(next(loader)) for _ in range(MICRO_BATCHES)]
    return batches


def pipeline_world(rank, world_size, shard_dir):
    import torch.distributed as dist

    out = {}
    for name, ranks in (("pp2", [0, 1]), ("pp3", [0, 1, 2])):
        group = dist.new_group(ranks)  # a collective call: every rank makes every group
        if rank not in ranks:  # rank 2 during PP2: the oracle, one loader that decodes all
            oracle = _loader(shard_dir)
            out["oracle"] = {"steps": _steps(oracle, prepare=False),
                             "skipped": oracle.counter.num_skipped,
                             "epoch": [_contents(b) for b in _loader(shard_dir).epoch()]}
            continue
        pipeline = PipelineGroup(group, leader=ranks[0])
        decodes = rank == ranks[0] or (name == "pp3" and rank == ranks[-1])
        loader = _loader(shard_dir, decode_pixels=decodes, pipeline=pipeline)
        steps = _steps(loader, prepare=True)
        fresh = _loader(shard_dir, decode_pixels=decodes, pipeline=pipeline)
        out[name] = {"steps": steps, "decodes": decodes, "state": loader.state_dict(),
                     "epoch": [_contents(b) for b in fresh.epoch()]}
    if rank == 1:  # off the first stage nothing loads outside an agreement
        with pytest.raises(RuntimeError, match="prepare"):
            next(_loader(shard_dir, decode_pixels=False, pipeline=pipeline))
    # The first stage aborts on its bad-sample budget: every stage raises.
    if rank < 2:
        counter = BadSampleCounter(max_bad_fraction=0.0, min_samples=1)
        loader = _loader(shard_dir, decode_pixels=rank == 0, counter=counter,
                         pipeline=PipelineGroup(dist.new_group([0, 1]), leader=0))
        with pytest.raises(RuntimeError) as info:
            loader.prepare(MICRO_BATCHES)
        out["abort"] = str(info.value)
    else:
        dist.new_group([0, 1])
    return out


@pytest.fixture(scope="module")
def worlds(bad_data):
    return run_world(pipeline_world, 3, args=(bad_data[0],))


def _layout(contents: dict) -> dict:
    return {k: v for k, v in contents.items() if k != "pixels"}


@pytest.mark.parametrize("name", ["pp2", "pp3"])
def test_every_stage_sees_the_first_stages_packs(bad_data, worlds, name):
    _, plan, broken = bad_data
    oracle = worlds[2]["oracle"]
    # The oracle skipped the broken samples and the all-bad third pack.
    assert [b["pack"] for b in oracle["steps"]] == [1, 2, 4, 5, 6, 7]
    assert oracle["skipped"] == len(broken)
    assert oracle["steps"][0]["keys"] == plan[0][1:]
    assert not set(broken) & {k for b in oracle["steps"] + oracle["epoch"] for k in b["keys"]}
    stages = [r[name] for r in worlds if name in r]
    assert len(stages) == int(name[-1])
    for stage in stages:
        for part in ("steps", "epoch"):
            assert [_layout(b) for b in stage[part]] == [_layout(b) for b in oracle[part]]
            if stage["decodes"]:
                assert [b["pixels"] for b in stage[part]] == [b["pixels"] for b in oracle[part]]
            else:
                assert not any(b["pixels"] for b in stage[part])
        # every stage's sampler ends where the first stage's did (a resume restarts them alike)
        assert stage["state"] == stages[0]["state"]


def test_a_failure_on_the_first_stage_fails_every_stage(worlds):
    assert "too many bad samples" in worlds[0]["abort"]
    assert "first pipeline stage failed" in worlds[1]["abort"]


def test_decision_message_round_trip():
    decision = Decision((PackChoice(3, (7, 1, 9), ((2, 4), (6, 6), (4, 2))), PackChoice(5, (), ())),
                        end_pack_number=8)
    assert decode_decision(encode_decision(decision)) == decision
    aborted = Decision((), 2, aborted=True)
    assert decode_decision(encode_decision(aborted)) == aborted
