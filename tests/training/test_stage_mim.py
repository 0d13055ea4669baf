"""Stage I (MIM) through the trainer at DP=2: the loss falls, and so does the held-out MIM loss
while the prediction-target cosine rises; the evaluation counts every held-out image and exactly
round(0.75·n) masked patches of each; the evaluate CLI reads the trained checkpoint. (Parallel
layouts against the single rank: test_stage_layouts.py.)"""

import pytest

from megatron_finevit.testing.stage_assets import (
    assets_and_world,
    run_evaluate_cli,
    tiny_run,
)

MAX_PIXELS = 84 * 84  # tiny_run's resolution


def dp2_world(rank, world_size, assets, ckpt):
    from megatron_finevit.training.trainer import Trainer

    cfg = tiny_run("mim", assets, steps=8, global_batch=4, eval_data_dir=assets["eval"])
    cfg.eval.at_start = cfg.eval.at_end = True
    cfg.checkpoint.dir = ckpt
    return Trainer(cfg).train()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return assets_and_world(tmp_path_factory, "mim", dp2_world)


def _expected_counts(eval_dir: str) -> tuple[int, int]:
    """(images, masked patches) of the held-out split from its index: every image once, each
    with round-half-up(0.75 · its patch count) masked."""
    from megatron_finevit.data.index import load_index
    from megatron_finevit.data.resize import ResizePolicy

    index = load_index(eval_dir)
    policy = ResizePolicy(max_pixels=MAX_PIXELS)
    patches = [policy.num_patches(int(h), int(w)) for h, w in zip(index.height, index.width)]
    return len(patches), sum(int(0.75 * n + 0.5) for n in patches)


def test_training_and_held_out_loss_fall(results):
    assets, _, ranks = results
    losses = ranks[1]["losses"]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:2]) / 2
    start, end = ranks[1]["evaluations"]["start"], ranks[1]["evaluations"]["end"]
    assert end["mim_loss"] < 0.9 * start["mim_loss"]
    assert end["mim_cosine"] > start["mim_cosine"] + 0.05
    images, masked = _expected_counts(assets["eval"])
    for evaluation in (start, end):
        assert (evaluation["num_images"], evaluation["masked_tokens"]) == (images, masked)


def test_evaluate_cli_on_the_trained_checkpoint(results, tmp_path):
    assets, ckpt, ranks = results
    stdout, cli = run_evaluate_cli(ckpt, assets["eval"], "mim", 29678, tmp_path / "eval.json")
    assert "masked patches" in stdout
    assert (cli["num_images"], cli["masked_tokens"]) == _expected_counts(assets["eval"])
    # one process packs (and so masks) differently from DP=2, but it is the trained model
    start = ranks[1]["evaluations"]["start"]
    assert cli["mim_loss"] < 0.9 * start["mim_loss"]
    assert cli["mim_cosine"] > start["mim_cosine"] + 0.05
    wrong_task = run_evaluate_cli(ckpt, assets["eval"], "retrieval", 29678)
    assert wrong_task.returncode == 2 and "does not apply to a mim run" in wrong_task.stderr
