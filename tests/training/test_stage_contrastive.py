"""Stage II (contrastive) through the trainer at DP=2: the loss falls; the text tower is frozen
(bit-identical) before ``unfreeze_text_at`` while the ViT trains, and trains after; a run
pre-empted by SIGUSR1 before the unfreeze, and runs resumed from checkpoints taken at the
unfreeze, after it, at the context + resolution switch and after it, give the uninterrupted run's
losses exactly and its optimiser groups (members, lr, weight decay); the evaluate CLI gives the
in-training retrieval numbers."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_finevit.testing.multirank import run_world
from megatron_finevit.testing.stage_assets import (
    assets_and_world,
    run_evaluate_cli,
    tiny_run,
)

STEPS = 8
SIGNAL_AT = 1  # the pre-empted run stops after step 1 and resumes at 2, before the unfreeze at 3
RESUME_AT = (3, 4, 6, 7)  # at the unfreeze, after it, at the context + resolution switch, after it


def _cfg(assets, ckpt=None, save_interval=0):
    cfg = tiny_run("contrastive", assets, steps=STEPS, global_batch=4, unfreeze_text_at=3,
                   context_schedule=[[6, 32]], eval_data_dir=assets["eval"])
    cfg.stage_config["data"]["max_pixels_schedule"] = [[6, 112 * 112]]
    cfg.checkpoint.dir = ckpt
    cfg.checkpoint.save_interval, cfg.checkpoint.keep_last = save_interval, STEPS
    return cfg


def _alone(ckpt: str, step: int, directory: Path) -> str:
    """Copy ``iter_{step}`` of ``ckpt`` into a fresh ``directory`` as its latest (rank 0)."""
    import torch.distributed as dist

    name = f"iter_{step:07d}"
    if dist.get_rank() == 0:
        shutil.copytree(Path(ckpt) / name, directory / name)
        (directory / "latest").write_text(name)
    dist.barrier()
    return str(directory)


def _snapshot(module):
    tower = torch.cat([p.detach().flatten().clone() for p in module.text_tower.parameters()])
    return tower, module.encoder.decoder.layers[0].mlp.linear_fc1.weight.detach().clone()


def world(rank, world_size, assets, ckpt):
    from megatron_finevit.testing.toy_stage import instrument_steps
    from megatron_finevit.training.trainer import Trainer

    out = {"losses": [], "tower_changed": [], "vit_changed": []}
    trainer = Trainer(_cfg(assets))
    out["groups"] = instrument_steps(trainer)
    for _ in range(STEPS):
        before = _snapshot(trainer.stage.module)
        out["losses"].append(trainer.train_step()["loss"])
        after = _snapshot(trainer.stage.module)
        out["tower_changed"].append(not torch.equal(before[0], after[0]))
        out["vit_changed"].append(not torch.equal(before[1], after[1]))
    # pre-empted by SIGUSR1 before the unfreeze, resumed in a fresh trainer; both save every step
    first = Trainer(_cfg(assets, ckpt, save_interval=1))
    instrument_steps(first, signal_at_step=SIGNAL_AT)
    head = first.train()
    cfg = _cfg(assets, ckpt, save_interval=1)
    cfg.eval.at_end = True
    resumed = Trainer(cfg)
    at = resumed.state.step
    out["stopped"] = (head["stopped_by_signal"], head["state"]["step"], at)
    out["resumed_groups"] = {at: instrument_steps(resumed)}
    result = resumed.train()
    out["resumed_losses"] = {at: head["losses"] + result["losses"]}
    out["final_eval"] = result["evaluations"]["end"]
    # each later checkpoint alone in a fresh directory, resumed to the end
    for step in RESUME_AT:
        again = Trainer(_cfg(assets, _alone(ckpt, step, Path(ckpt).parent / f"from_{step}")))
        out["resumed_groups"][step] = instrument_steps(again)
        out["resumed_losses"][step] = again.train()["losses"]
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return assets_and_world(tmp_path_factory, "contrastive", world)


def test_loss_falls(results):
    losses = results[2][1]["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:2]) / 2


def test_text_tower_frozen_then_trained(results):
    for rank in (0, 1):
        r = results[2][rank]
        assert r["tower_changed"] == [False] * 3 + [True] * (STEPS - 3)
        assert all(r["vit_changed"])


def test_resume_through_checkpoint_is_exact(results):
    for rank in (0, 1):
        r = results[2][rank]
        assert r["stopped"] == (True, SIGNAL_AT + 1, SIGNAL_AT + 1)
        assert r["resumed_losses"][SIGNAL_AT + 1] == r["losses"]  # bit-exact
        for step in RESUME_AT:
            assert r["resumed_losses"][step] == r["losses"][step:], step


def test_resumed_groups_equal_uninterrupted(results):
    """After every load, each optimiser group holds the uninterrupted run's parameters, lr,
    weight decay and scheduler keys at every step; resumed before the unfreeze, only the text
    tower's groups are frozen (the bug: every group took the tower's saved settings)."""
    for rank in (0, 1):
        r = results[2][rank]
        for step, groups in r["resumed_groups"].items():
            assert groups == r["groups"][step:], step
    first = [g for rank in (0, 1) for g in results[2][rank]["resumed_groups"][SIGNAL_AT + 1][0]
             if g["members"]]  # both ranks: each updates its shard (distributed optimizer)
    tower = [g for g in first if g["name"] == "text_tower"]
    rest = [g for g in first if g["name"] is None]
    assert tower and rest and len(tower) + len(rest) == len(first)
    assert all(g["lr"] == 0.0 for g in tower) and all(g["lr"] > 0.0 for g in rest)
    assert all(n.startswith("text_tower.") for g in tower for n in g["members"])
    assert not any(n.startswith("text_tower.") for g in rest for n in g["members"])
    assert any(n == "siglip.logit_scale" for g in rest for n in g["members"])
    assert {g["wd_mult"] for g in first} == {0.0, 1.0}  # biases, norms, t and b: no decay


def test_evaluate_cli_matches_training_evaluation(results, tmp_path):
    assets, ckpt, worlds = results
    stdout, cli = run_evaluate_cli(ckpt, assets["eval"], "retrieval", 29677, tmp_path / "eval.json")
    assert "text->image" in stdout
    trained = worlds[1]["final_eval"]
    n = trained["num_images"]
    assert cli["num_images"] == n and not any(k.startswith("zero_shot") for k in cli)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert cli[key] == pytest.approx(trained[key], abs=2.5 / n)  # DP=1 vs 2: float-level ties


def text_init_world(rank, world_size, assets, ckpt_dir):
    """A converted text tower (24 positions) initialises the stage's tower (32 positions)."""
    from megatron_finevit.config.text import tiny_text
    from megatron_finevit.convert.mcore_io import save_model_checkpoint
    from megatron_finevit.models.text_tower import build_text_tower
    from megatron_finevit.platform import ParallelConfig, init_parallel
    from megatron_finevit.training.stages.contrastive import ContrastiveStage

    init_parallel(ParallelConfig())
    torch.manual_seed(7)
    text = tiny_text(vocab_size=128, num_layers=1, max_position_embeddings=24, init_std=0.125)
    source = build_text_tower(text, text.to_transformer_config())
    os.makedirs(ckpt_dir, exist_ok=True)
    save_model_checkpoint(source, ckpt_dir)
    cfg = _cfg(assets)
    cfg.stage_config["text_init_dir"] = ckpt_dir
    stage = ContrastiveStage(cfg)
    tower = stage.build_model(pre_process=True, post_process=True).text_tower
    target = dict(tower.named_parameters())
    diffs = {}
    for name, param in source.named_parameters():
        mine = target[name][:24] if "position_embeddings" in name else target[name]
        diffs[name] = (mine - param).abs().max().item()
    return {"diffs": diffs, "positions": target["embedding.position_embeddings.weight"].shape[0]}


def test_text_tower_initialised_from_converted_weights(results, tmp_path):
    assets = results[0]
    (result,) = run_world(text_init_world, 1, args=(assets, str(tmp_path / "tower")))
    assert result["positions"] == 32
    assert result["diffs"] and max(result["diffs"].values()) == 0.0, result["diffs"]
