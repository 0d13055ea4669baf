"""Stage I (MIM) through the trainer: the loss falls at DP=2 (parallel layouts against the single
rank: test_stage_layouts.py)."""

from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.stage_assets import make_stage_assets, tiny_run


def dp2_world(rank, world_size, assets):
    from megatron_finevit.training.trainer import Trainer

    return Trainer(tiny_run("mim", assets, steps=8, global_batch=4)).train()["losses"]


def test_loss_falls_at_dp2(tmp_path):
    assets = make_stage_assets(tmp_path / "assets")
    losses = run_world(dp2_world, 2, args=(assets,))[1]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:2]) / 2
