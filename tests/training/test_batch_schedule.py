"""``samples_per_step`` at a realistic scale, on the packing alone (no images decoded): 40,000
FineCap-mini image sizes (the synthetic data's own size draw), Stage II's two policies (336²,
then 448²), 8,192-token packs, 8 data-parallel ranks. The packs per step that
``training.batch_schedule`` derives for each phase, filled to the tokens ``fill_for_samples``
finds, taken from every rank's own sampler as the trainer does, hold the configured 8,192
samples: every step within ±1% in both phases. Rounding whole full packs per rank instead
misses by up to half a pack a rank (a step off by 1.6% here), and a fixed pack count would lose
~40% of the samples at the switch."""

import numpy as np
import pytest

from megatron_finevit.data.packing import PackedBatchSampler
from megatron_finevit.data.resize import ResizePolicy
from megatron_finevit.training.batch_schedule import fill_for_samples, micro_batches_for
from megatron_finevit.training.stages.vision import packed_samples_per_pack

NUM, DP, PACK_TOKENS, BUFFER, MIN_FILL, SEED = 40_000, 8, 8192, 1024, 0.95, 0
SAMPLES_PER_STEP, STEPS = 8192, 8
POLICIES = (336 * 336, 448 * 448)


@pytest.fixture(scope="module")
def sizes():
    from megatron_finevit.data.synthetic import SceneSpec, _image_size

    rng = np.random.default_rng(0)
    originals = [_image_size(rng, SceneSpec()) for _ in range(NUM)]
    return {max_pixels: np.array([ResizePolicy(max_pixels=max_pixels).num_patches(h, w)
                                  for h, w in originals], dtype=np.int64)
            for max_pixels in POLICIES}


def _endless(sampler):
    while True:  # one epoch per iter(), then the next (reshuffled), as the loader runs it
        yield from sampler


def _steps(tokens: np.ndarray, packs_per_step: int, fill: int = PACK_TOKENS) -> list[int]:
    """Samples in each of ``STEPS`` steps: every rank takes its share of the packs, filled to
    ``fill`` tokens, from its own sampler."""
    streams = [_endless(PackedBatchSampler(tokens, fill, buffer_size=BUFFER, seed=SEED,
                                           dp_rank=rank, dp_size=DP, min_fill=MIN_FILL))
               for rank in range(DP)]
    return [sum(len(next(stream)) for stream in streams for _ in range(packs_per_step // DP))
            for _ in range(STEPS)]


def _per_pack(tokens: np.ndarray, fill: int = PACK_TOKENS) -> float:
    return packed_samples_per_pack(tokens, fill, BUFFER, MIN_FILL, SEED, DP)


def test_each_step_holds_the_samples_in_both_phases(sizes):
    fills = {p: fill_for_samples(lambda fill, p=p: _per_pack(sizes[p], fill), SAMPLES_PER_STEP,
                                 DP, int(sizes[p].max()), PACK_TOKENS) for p in POLICIES}
    packs = {p: micro_batches_for(SAMPLES_PER_STEP, _per_pack(sizes[p], fills[p]), DP)
             for p in POLICIES}
    assert packs[POLICIES[1]] > 1.5 * packs[POLICIES[0]]  # 448² images fill packs faster
    for policy in POLICIES:
        assert int(sizes[policy].max()) <= fills[policy] < PACK_TOKENS
        steps = _steps(sizes[policy], packs[policy], fills[policy])
        # measured: 336² 8,146-8,201, 448² 8,142-8,244 (a step's ~900 packs spread ±0.7%)
        assert all(abs(s / SAMPLES_PER_STEP - 1) <= 0.01 for s in steps), (policy, steps)


def test_whole_full_packs_per_rank_miss_by_up_to_half_a_pack(sizes):
    """The oracle for the fill: without it, whole full packs per rank, rounded, put 448² steps
    up to 1.6% over (measured 8,186-8,321): the mean still within 1%, a step not."""
    policy = POLICIES[1]
    packs = micro_batches_for(SAMPLES_PER_STEP, _per_pack(sizes[policy]), DP)
    steps = _steps(sizes[policy], packs)
    assert abs(np.mean(steps) / SAMPLES_PER_STEP - 1) <= 0.01
    assert max(abs(s / SAMPLES_PER_STEP - 1) for s in steps) > 0.01, steps


def test_a_fixed_pack_count_loses_samples_at_the_switch(sizes):
    first = micro_batches_for(SAMPLES_PER_STEP, _per_pack(sizes[POLICIES[0]]), DP)
    fixed = _steps(sizes[POLICIES[1]], first)
    assert max(fixed) < 0.7 * SAMPLES_PER_STEP, fixed


def test_the_training_loader_fills_packs_to_the_fitted_tokens(tmp_path):
    """The plumbing on real shards: ``resolve_batch_schedule`` has the stage fit one fill per
    resolution phase (between the phase's largest image and ``pack_tokens``), and the training
    loaders (``make_loader(fill=True)``, layout only) pack to it through the switch, while the
    eval-style loader (``fill=False``) still packs to ``pack_tokens``."""
    from megatron_finevit.data.index import build_index, load_index
    from megatron_finevit.data.synthetic import make_synthetic_shards
    from megatron_finevit.testing.stage_assets import tiny_run
    from megatron_finevit.training.batch_schedule import resolve_batch_schedule
    from megatron_finevit.training.stage import get_stage

    make_synthetic_shards(tmp_path, 1000, seed=0, samples_per_shard=250, progress=False)
    build_index(tmp_path, progress=False)
    cfg = tiny_run("mim", {"train": str(tmp_path), "teacher": str(tmp_path / "unused")}, 4)
    cfg.stage_config["data"].update(pack_tokens=1024, max_pixels=112 * 112, buffer_size=256,
                                    max_pixels_schedule=[[2, 168 * 168]])
    cfg.samples_per_step = 700
    stage = get_stage("mim")(cfg)
    resolve_batch_schedule(cfg, stage, 2, announce=False)
    fills = stage.cfg.data.fill_tokens
    index = load_index(tmp_path)
    largest = [int(stage._phase_sizes(index, policy).max()) for _, policy in stage.phases()]
    assert len(fills) == 2 and all(big <= f < 1024 for big, f in zip(largest, fills)), fills
    trained = [stage.make_loader(str(tmp_path), rank, 2, decode_pixels=False, fill=True)
               for rank in range(2)]
    full = stage.make_loader(str(tmp_path), 0, 2, decode_pixels=False)
    samples = []
    for step in range(4):
        phase = 0 if step < 2 else 1
        for loader in (*trained, full):
            loader.set_step(step)
        packs = [next(loader) for loader in trained
                 for _ in range(cfg.global_batch_at(step) // 2)]
        assert max(sum(p.image_tokens) for p in packs) <= fills[phase]
        assert max(sum(next(full).image_tokens) for _ in range(8)) > fills[phase]
        samples.append(sum(p.num_images for p in packs))
    # measured 710, 676, 702, 704: ~40 packs a step over 500-image epochs per rank spread a few
    # percent (the ±1% above needs the packs of a realistic step)
    assert all(abs(s / 700 - 1) < 0.05 for s in samples), samples
