"""Stage I (MIM) through the trainer: the TP=2 first-step loss equals the single-rank one from
the same weights; the loss falls at DP=2."""

import pytest

from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.stage_assets import make_stage_assets, tiny_run


def _first_loss(cfg):
    from megatron_finevit.training.trainer import Trainer

    return Trainer(cfg).train_step()["loss"]


def single_rank_world(rank, world_size, assets, init_dir):
    from megatron_finevit.training.trainer import Trainer

    init = tiny_run("mim", assets, steps=0)
    init.checkpoint.dir = init_dir
    init.parallel.distributed_optimizer = False  # its state cannot be saved before a step
    Trainer(init).train()  # saves the initial weights
    cfg = tiny_run("mim", assets, steps=1)
    cfg.checkpoint.load_dir = init_dir
    return _first_loss(cfg)


def two_rank_world(rank, world_size, assets, init_dir):
    from megatron_finevit.training.trainer import Trainer

    out = {}
    tp2 = tiny_run("mim", assets, steps=1, tp=2)
    tp2.checkpoint.load_dir = init_dir
    out["tp2_first_loss"] = _first_loss(tp2)
    dp2 = tiny_run("mim", assets, steps=8, global_batch=4)
    out["dp2_losses"] = Trainer(dp2).train()["losses"]
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("mim")
    assets = make_stage_assets(root / "assets")
    init_dir = str(root / "init")
    single = run_world(single_rank_world, 1, args=(assets, init_dir))[0]
    double = run_world(two_rank_world, 2, args=(assets, init_dir))
    return single, double


def test_tp2_first_step_loss_equals_single_rank(results):
    single, double = results
    for rank in (0, 1):
        assert double[rank]["tp2_first_loss"] == pytest.approx(single, rel=1e-5)


def test_loss_falls_at_dp2(results):
    losses = results[1][1]["dp2_losses"]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:2]) / 2
