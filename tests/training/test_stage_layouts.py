"""Stages I and II through the trainer at every parallel layout: from the same initial weights,
three training steps (so two optimizer updates feed back into the losses) at TP2 + SP, PP2 and
CP2 give the single-rank run's losses. Stage II runs its text tower beside the encoder: whole on
every TP rank's shard, on the last pipeline stage, replicated over the CP ranks."""

import pytest

from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.stage_assets import make_stage_assets, tiny_run

STAGES = ("mim", "contrastive")
LAYOUTS = {"tp2_sp": dict(tp=2, sp=True), "pp2": dict(pp=2), "cp2": dict(cp=2)}
STEPS = 3


def _losses(stage, assets, init_dir, **layout):
    from megatron_finevit.training.trainer import Trainer

    cfg = tiny_run(stage, assets, steps=STEPS, **layout)
    cfg.checkpoint.load_dir = init_dir
    trainer = Trainer(cfg)
    # the loss lives on the last pipeline stage; other stages report none
    return [trainer.train_step().get("loss") for _ in range(STEPS)]


def single_rank_world(rank, world_size, assets, init_dirs):
    from megatron_finevit.training.trainer import Trainer

    out = {}
    for stage in STAGES:
        init = tiny_run(stage, assets, steps=0)
        init.checkpoint.dir = init_dirs[stage]
        init.parallel.distributed_optimizer = False  # its state cannot be saved before a step
        Trainer(init).train()  # saves the initial weights
        out[stage] = _losses(stage, assets, init_dirs[stage])
    return out


def two_rank_world(rank, world_size, assets, init_dirs):
    return {(stage, name): _losses(stage, assets, init_dirs[stage], **layout)
            for stage in STAGES for name, layout in LAYOUTS.items()}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage_layouts")
    assets = make_stage_assets(root / "assets")
    init_dirs = {stage: str(root / f"init_{stage}") for stage in STAGES}
    (single,) = run_world(single_rank_world, 1, args=(assets, init_dirs))
    double = run_world(two_rank_world, 2, args=(assets, init_dirs))
    return single, double


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("stage", STAGES)
def test_losses_equal_single_rank(results, stage, name):
    single, double = results
    assert len(single[stage]) == STEPS and len(set(single[stage])) == STEPS  # it trains
    holders = [r[(stage, name)] for r in double if r[(stage, name)][0] is not None]
    # TP and CP ranks all report the loss; under PP only the last stage does
    assert len(holders) == (1 if name == "pp2" else 2)
    for losses in holders:
        assert losses == pytest.approx(single[stage], rel=1e-5)
