"""Stages I and II through the trainer at every parallel layout: from the same initial weights,
three training steps (so two optimizer updates feed back into the losses) at TP2 + SP, PP2 and
CP2 give the single-rank run's losses, and the held-out evaluation after them (Stage I: MIM loss
and cosine; Stage II: retrieval and zero-shot) gives the single-rank numbers. Stage II runs its
text tower beside the encoder: whole on every TP rank's shard, on the last pipeline stage,
replicated over the CP ranks."""

import pytest

from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.stage_assets import make_stage_assets, tiny_run

STAGES = ("mim", "contrastive")
LAYOUTS = {"tp2_sp": dict(tp=2, sp=True), "pp2": dict(pp=2), "cp2": dict(cp=2)}
STEPS = 3


def _run(stage, assets, init_dir, **layout):
    """(losses, evaluation) of three steps from ``init_dir``'s weights; on ranks off the last
    pipeline stage the losses are None and the evaluation empty."""
    from megatron_finevit.training.trainer import Trainer

    cfg = tiny_run(stage, assets, steps=STEPS, eval_data_dir=assets["eval"], **layout)
    cfg.checkpoint.load_dir = init_dir
    trainer = Trainer(cfg)
    losses = [trainer.train_step().get("loss") for _ in range(STEPS)]
    return losses, trainer.evaluate()


def single_rank_world(rank, world_size, assets, init_dirs):
    from megatron_finevit.training.trainer import Trainer

    out = {}
    for stage in STAGES:
        init = tiny_run(stage, assets, steps=0)
        init.checkpoint.dir = init_dirs[stage]
        init.parallel.distributed_optimizer = False  # its state cannot be saved before a step
        Trainer(init).train()  # saves the initial weights
        out[stage] = _run(stage, assets, init_dirs[stage])
    return out


def two_rank_world(rank, world_size, assets, init_dirs):
    return {(stage, name): _run(stage, assets, init_dirs[stage], **layout)
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
def test_losses_and_evaluation_equal_single_rank(results, stage, name):
    single, double = results
    losses, evaluation = single[stage]
    assert len(losses) == STEPS and len(set(losses)) == STEPS  # it trains
    key = "mim_cosine" if stage == "mim" else "i2t_r1"
    assert key in evaluation and evaluation["num_images"] == 48
    holders = [r[(stage, name)] for r in double if r[(stage, name)][0][0] is not None]
    # TP and CP ranks all report; under PP only the last stage does
    assert len(holders) == (1 if name == "pp2" else 2)
    for layout_losses, layout_evaluation in holders:
        assert layout_losses == pytest.approx(losses, rel=1e-5)
        assert layout_evaluation.keys() == evaluation.keys()
        for metric, value in evaluation.items():
            assert layout_evaluation[metric] == pytest.approx(value, rel=1e-5, abs=1e-6), metric
